"""Builds the optional native extensions.

fade_kernels._C (C++ CPU kernels from csrc/cpu + csrc/bindings) is built with torch's
cpp_extension and ninja whenever a C++ compiler is present. Without a compiler, or with
FADE_NO_EXT=1, the package installs pure-Python and `fade info` says why the CPU backend is
missing. Build against the installed torch: `pip install --no-build-isolation -e .`.

fade_kernels._C_cuda (csrc/cuda/*.cu + csrc/bindings/cuda_bindings.cpp) is built only when the
installed torch is a CUDA build (torch.version.cuda) and nvcc is found (CUDA_HOME); otherwise it is
skipped with a message and `fade info` says why the "cuda" backend is missing. FADE_NO_CUDA=1
skips it too. Without a GPU, python/check_cuda_compile.sh still compiles the .cu files.
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


def _cuda_extension():
    """The CUDAExtension fade_kernels._C_cuda, or None (with the reason on stderr)."""
    if os.environ.get("FADE_NO_EXT") == "1" or os.environ.get("FADE_NO_CUDA") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None:
        print(f"fade-kernels: torch {torch.__version__} is not a CUDA build, skipping the CUDA extension",
              file=sys.stderr)
        return None
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        print("fade-kernels: nvcc not found (set CUDA_HOME), skipping the CUDA extension", file=sys.stderr)
        return None
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + [os.path.join("csrc", "bindings", "cuda_bindings.cpp")]
    return CUDAExtension(
        name="fade_kernels._C_cuda",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-Wall"], "nvcc": ["-O3"]},
    )


built = _cpu_extension()
cuda_extension = _cuda_extension() if built is not None else None
if built is None:
    setup()
else:
    extension, build_ext = built
    setup(ext_modules=[extension] + ([cuda_extension] if cuda_extension is not None else []),
          cmdclass={"build_ext": build_ext})
