"""Second tier for the Triton kernels: compile them for sm_90 without a GPU and inspect the PTX.

The test process runs with TRITON_INTERPRET=1 (tests/conftest.py), which replaces triton.jit, so
fade_kernels.ops.triton_compile_check runs in a subprocess with the variable removed. It compiles
the GEMV and the GEMM for 3- and 4-bit codes with float16 activations through
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) and checks `.target sm_90(a)`,
tensor-core instructions (wgmma / mma.sync) in the GEMM, and a cubin from ptxas. Skipped only
when triton or its ptxas is missing (the script's exit status 2).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.compile, pytest.mark.subprocess]


def test_kernels_compile_for_sm90_with_tensor_core_gemm():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default
    proc = subprocess.run(
        [sys.executable, "-m", "fade_kernels.ops.triton_compile_check", "--arch", "90", "--bits", "3", "4",
         "--dtypes", "float16", "--json"],
        env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines, f"no JSON from the compile check (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results = json.loads(lines[-1])
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0
    assert {(r["kernel"], r["bits"]) for r in results} == {("gemv", 3), ("gemv", 4), ("gemm", 3), ("gemm", 4)}
    for r in results:
        assert r["target"] in ("sm_90", "sm_90a")
        if r["kernel"] == "gemm":
            assert r["wgmma"] + r["mma"] > 0
