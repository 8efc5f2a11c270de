"""The fused GPTQ sweep compiles for sm_90 without a GPU, with the arithmetic exactness needs.

Runs fade_kernels/solver/triton_sweep_compile_check.py in a separate process without
TRITON_INTERPRET (the interpreter, which tests/conftest.py turns on, replaces triton.jit and
cannot compile). Skips only when that script reports triton or ptxas unusable (exit status 2).
"""
import json
import os
import subprocess
import sys

import pytest

from fade_kernels.solver import triton_sweep_compile_check as check

pytestmark = [pytest.mark.compile, pytest.mark.subprocess]


def test_sweep_kernel_compiles_for_sm90_without_fma_or_approximate_division():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fade_kernels.solver.triton_sweep_compile_check",
                           "--arch", "90", "--quick", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == check.EXIT_UNUSABLE:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip())
    assert proc.stdout.strip(), f"no output; stderr:\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["bits"], r["sym"], r["static"]) for r in results] == list(check.QUICK_CASES)
    for r in results:
        assert r["ok"], r.get("error")
        assert r["target"] in ("sm_90", "sm_90a")
        assert r["fma_f32"] == 0 and r["div_rn_f32"] > 0 and r["div_inexact_f32"] == 0
        assert r["cubin_bytes"] > 0
    assert proc.returncode == check.EXIT_OK


def test_check_ptx_flags_contracted_and_approximate_arithmetic():
    # The checker itself must be able to fail: feed it PTX with the forbidden instructions.
    bad = ".version 8.7\n.target sm_90a\n fma.rn.f32 %f3, %f1, %f2, %f3;\n div.full.f32 %f4, %f1, %f2;\n"
    case = check.check_ptx({"arch": 90}, bad, b"\x7fELF")
    assert not case["ok"]
    assert "fma.rn.f32" in case["error"] and "approximate" in case["error"] and "0f4B400000" in case["error"]
    good = ".target sm_90a\n div.rn.f32 %f4, %f1, %f2;\n add.f32 %f5, %f4, 0f4B400000;\n"
    assert check.check_ptx({"arch": 90}, good, b"\x7fELF")["ok"]
    assert not check.check_ptx({"arch": 90}, good.replace("sm_90a", "sm_80"), b"\x7fELF")["ok"]
