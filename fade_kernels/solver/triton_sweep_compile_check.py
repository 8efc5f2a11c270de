"""Compile the fused GPTQ sweep kernel for a GPU without having one, and inspect the PTX.

    python -m fade_kernels.solver.triton_sweep_compile_check [--arch 90] [--json]

Runs triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) on
`triton_sweep._gptq_block_sweep_kernel` for dynamic and static (act-order) grids, asymmetric and
symmetric, 3 and 4 bits, B = 128, and checks what the bit-exactness argument of triton_sweep.py
relies on:
  - the PTX declares `.target sm_<arch>` (or `sm_<arch>a`, the arch-specific variant);
  - no float32 fused multiply-add (`fma.rn.f32`): the kernel is compiled with
    enable_fp_fusion=False, as the launcher does, so `w - err * u` keeps torch's two roundings;
  - float32 divisions are IEEE (`div.rn.f32`), none approximate (`div.full.f32`, `div.approx.f32`);
  - the round-half-even constant 1.5 * 2^23 (`0f4B400000`) survived, i.e. (x + c) - c was not folded;
  - ptxas turned the PTX into a cubin.
Must run with TRITON_INTERPRET unset (the interpreter replaces triton.jit); the test
tests/solver/test_triton_sweep_compile.py runs it in a subprocess for that reason.
Exit status: 0 all checks passed, 1 a check failed, 2 triton is unusable (not installed,
interpreter on, or no ptxas), so that callers can skip rather than fail.
"""
from __future__ import annotations

import argparse
import re
import sys

# One definition of "can this process compile Triton for NVIDIA", of the exit codes (re-exported
# for the tests) and of the printed report, shared with the matmul kernels' check.
from fade_kernels.ops.triton_compile_check import (  # noqa: E402
    EXIT_FAILED, EXIT_OK, EXIT_UNUSABLE, check_compiled, report, unusable_reason)


# (bits, sym, static): every code path of the kernel at least once.
CASES = ((4, False, False), (3, False, False), (4, True, False), (3, True, True), (4, False, True))
# Both grid paths (dynamic asymmetric, static symmetric) in two compiles, for the unit test.
QUICK_CASES = ((4, False, False), (3, True, True))


def _source(kernel, bits: int, sym: bool, static: bool, block_b: int):
    """ASTSource with the launcher's configuration for a GPU (16 rows per program)."""
    from triton.compiler import ASTSource

    signature = {
        "w_ptr": "*fp32", "u_ptr": "*fp32", "codes_ptr": "*i32", "scales_ptr": "*fp32", "zeros_ptr": "*fp32",
        "err_ptr": "*fp32", "loss_ptr": "*fp32", "gidx_ptr": "*i32",
        "n_rows": "i32", "i1": "i32", "i2": "i32", "group": "i32",
        "stride_w": "i32", "stride_u": "i32", "stride_c": "i32", "stride_s": "i32", "stride_e": "i32",
        "BITS": "constexpr", "SYM": "constexpr", "STATIC": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr",
    }
    constexprs = {"BITS": bits, "SYM": sym, "STATIC": static, "BLOCK_N": 16, "BLOCK_B": block_b, "BLOCK_C": 64}
    # Pointers from torch allocations are 16-byte aligned; the row strides of real layers
    # (K a multiple of 32) are multiples of 16 elements.
    hinted = [n for n in signature if n.endswith("_ptr")] + ["stride_w", "stride_u", "stride_c"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _sweep_errors(case: dict, ptx: str) -> list[str]:
    case["fma_f32"] = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx))
    case["div_rn_f32"] = len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32\b", ptx))
    case["div_inexact_f32"] = len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx))
    case["rne_constant"] = "0f4B400000" in ptx
    errors = []
    if case["fma_f32"]:
        errors.append(f"{case['fma_f32']} fma.rn.f32 in the PTX: multiply-subtract was contracted")
    if not case["div_rn_f32"] or case["div_inexact_f32"]:
        errors.append(f"divisions: {case['div_rn_f32']} div.rn.f32, {case['div_inexact_f32']} approximate")
    if not case["rne_constant"]:
        errors.append("round-half-even constant 1.5*2^23 (0f4B400000) missing: (x + c) - c was folded")
    return errors


def check_ptx(case: dict, ptx: str, cubin: bytes) -> dict:
    """Fill case with the PTX target, instruction counts and ok/error."""
    return check_compiled(case, ptx, cubin, _sweep_errors)


def compile_all(arch: int = 90, block_b: int = 128, cases=CASES) -> list[dict]:
    """Compile every (bits, sym, static) case; one result dict per case."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fade_kernels.solver import triton_sweep as ts

    target = GPUTarget("cuda", arch, 32)
    # The same options as the launcher in triton_sweep.triton_gptq_sweep.
    options = {"num_warps": 4, "enable_fp_fusion": False}
    results = []
    for bits, sym, static in cases:
        case = {"bits": bits, "sym": sym, "static": static, "arch": arch, "block_b": block_b}
        try:
            compiled = triton.compile(_source(ts._gptq_block_sweep_kernel, bits, sym, static, block_b),
                                      target=target, options=options)
        except Exception as exc:  # report every case, not just the first failure
            case.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            results.append(case)
            continue
        results.append(check_ptx(case, compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")))
        case.update(_resource_usage(compiled.asm.get("cubin", b"")))
    return results


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local-memory bytes per thread from cuobjdump, when it is there (informative:
    LOCAL > 0 means the (BLOCK_N, BLOCK_B) tile spilled out of registers)."""
    import subprocess
    import tempfile

    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # no cuobjdump: the check does not depend on it
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    return {"registers": int(m.group(1)), "local_bytes": int(m.group(2))} if m else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--block-size", type=int, default=128, help="columns per block B (power of two)")
    parser.add_argument("--quick", action="store_true", help="two cases (dynamic asym 4-bit, static sym 3-bit)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    results = None if unusable_reason() else compile_all(args.arch, args.block_size,
                                                         QUICK_CASES if args.quick else CASES)
    return report(results, args.json, lambda r: (
        f"{r['bits']}-bit sym={r['sym']!s:5} static={r['static']!s:5} target={r.get('target')} "
        f"fma.f32={r.get('fma_f32')} div.rn={r.get('div_rn_f32')} regs={r.get('registers')} "
        f"local={r.get('local_bytes')}B cubin={r.get('cubin_bytes', 0)}B"))


if __name__ == "__main__":
    sys.exit(main())
