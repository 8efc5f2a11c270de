"""Builds the optional native extensions.

fade_kernels._C (C++ CPU kernels from csrc/cpu + csrc/bindings) is built with torch's
cpp_extension and ninja whenever a C++ compiler is present. Without a compiler, or with
FADE_NO_EXT=1, the package installs pure-Python and `fade info` says why the CPU backend is
missing. Build against the installed torch: `pip install --no-build-isolation -e .`.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_extension():
    if os.environ.get("FADE_NO_EXT") == "1":
        print("fade-kernels: FADE_NO_EXT=1, skipping the C++ extension", file=sys.stderr)
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fade-kernels: no C++ compiler found, skipping the C++ extension", file=sys.stderr)
        return None
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fade-kernels: torch is not importable at build time (use --no-build-isolation), "
              "skipping the C++ extension", file=sys.stderr)
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")) + glob.glob(os.path.join("csrc", "bindings", "cpu_*.cpp")))
    if not sources:
        return None
    extension = CppExtension(
        name="fade_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-Wall"],
        extra_link_args=["-fopenmp"],
    )
    return extension, BuildExtension.with_options(use_ninja=True)


built = _cpu_extension()
if built is None:
    setup()
else:
    extension, build_ext = built
    setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})
