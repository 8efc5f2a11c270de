"""Compile the Triton dequant-matmul kernels for a GPU without having one, and inspect the PTX.

    python -m fade_kernels.ops.triton_compile_check [--arch 90] [--bits 3 4] [--dtypes float16 bfloat16] [--json]

Runs triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) on `_qgemv_kernel` and
`_qgemm_kernel` for each code width and activation dtype (default: 3 and 4 bits, float16 and
bfloat16), then checks:
  - every PTX declares `.target sm_<arch>` (or `sm_<arch>a`, the arch-specific variant);
  - every float16/bfloat16 GEMM PTX contains matrix instructions (mma.sync or wgmma), i.e. tl.dot
    reached the tensor cores rather than falling back to FMA loops (float32 compiles with IEEE
    dot products, torch's default for fp32 matmul, which are FMA loops by design);
  - ptxas turned each PTX into a cubin.
Must run with TRITON_INTERPRET unset (the interpreter replaces triton.jit); the test
tests/ops/test_triton_compile_sm90.py runs it in a subprocess for that reason.
Exit status: 0 all checks passed, 1 a check failed, 2 triton is unusable (not installed,
interpreter on, or no ptxas), so that callers can skip rather than fail.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2

_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _gemv_source(kernel, bits: int, dtype: str):
    """ASTSource for the GEMV with one plausible decode config (M = 1, 128 inputs per step)."""
    from triton.compiler import ASTSource

    t = _TORCH_TO_TRITON[dtype]
    signature = {
        "x_ptr": f"*{t}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
        "bias_ptr": "*fp32", "out_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_zg": "i32", "stride_ok": "i32", "group_size": "i32",
        "steps_per_split": "i32",
        "BITS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_R": "constexpr", "BLOCK_N": "constexpr",
        "HAS_BIAS": "constexpr",
    }
    constexprs = {"BITS": bits, "BLOCK_M": 1, "BLOCK_R": 4, "BLOCK_N": 256, "HAS_BIAS": True}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=_aligned(kernel, signature))


def _gemm_source(kernel, bits: int, dtype: str):
    """ASTSource for the GEMM with a typical encoder tile (128 x 128 x 64)."""
    from triton.compiler import ASTSource

    t = _TORCH_TO_TRITON[dtype]
    signature = {
        "x_ptr": f"*{t}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
        "bias_ptr": "*fp32", "out_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_zg": "i32", "group_size": "i32", "m_bucket": "i32",
        "BITS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "GROUP_M": "constexpr", "HAS_BIAS": "constexpr", "DOT_PRECISION": "constexpr", "UPCAST_DOT": "constexpr",
    }
    constexprs = {"BITS": bits, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "HAS_BIAS": True,
                  "DOT_PRECISION": "ieee", "UPCAST_DOT": False}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=_aligned(kernel, signature))


def _aligned(kernel, signature: dict) -> dict:
    """Divisibility-by-16 hints for pointers, N, K and the strides: what the launcher sees for
    real layer shapes (Whisper/Moonshine widths are multiples of 16) and what lets Triton vectorize."""
    names = [n for n in signature if signature[n] != "constexpr"]
    hinted = {n for n in names if n.endswith("_ptr")} | {"N", "K", "stride_xm", "stride_zg"}
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n in hinted}


def compile_all(arch: int = 90, bits_list=(3, 4), dtypes=("float16", "bfloat16")) -> list[dict]:
    """Compile every (kernel, bits, dtype) case; one result dict per case (see check_case)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fade_kernels.ops import triton_qmatmul as tq

    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel_name, make, kernel, options in (
            ("gemv", _gemv_source, tq._qgemv_kernel, {"num_warps": 4, "num_stages": 2}),
            ("gemm", _gemm_source, tq._qgemm_kernel, {"num_warps": 8, "num_stages": 3})):
        for bits in bits_list:
            for dtype in dtypes:
                case = {"kernel": kernel_name, "bits": bits, "dtype": dtype, "arch": arch}
                try:
                    compiled = triton.compile(make(kernel, bits, dtype), target=target, options=options)
                except Exception as exc:  # report every case, not just the first failure
                    case.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
                    results.append(case)
                    continue
                results.append(check_case(case, compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")))
    return results


def check_compiled(case: dict, ptx: str, cubin: bytes, kernel_errors) -> dict:
    """Fill case with the PTX target and cubin size, run kernel_errors(case, ptx) -> list of
    messages for the kernel's own checks, and set ok/error. Shared by every compile check."""
    arch = case["arch"]
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    case["target"] = m.group(1) if m else None
    case["cubin_bytes"] = len(cubin or b"")
    errors = []
    if case["target"] not in (f"sm_{arch}", f"sm_{arch}a"):
        errors.append(f"PTX targets {case['target']}, expected sm_{arch} or sm_{arch}a")
    errors += kernel_errors(case, ptx)
    if not case["cubin_bytes"]:
        errors.append("ptxas produced no cubin")
    case["ok"] = not errors
    if errors:
        case["error"] = "; ".join(errors)
    return case


def _matmul_errors(case: dict, ptx: str) -> list[str]:
    case["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    case["mma"] = len(re.findall(r"\bmma\.sync", ptx))
    # fp32 activations compile with IEEE dot products (torch's default), which are FMA loops by design.
    if case["kernel"] == "gemm" and case["dtype"] != "float32" and case["wgmma"] + case["mma"] == 0:
        return ["GEMM PTX has no mma.sync / wgmma instruction: tl.dot did not reach the tensor cores"]
    return []


def check_case(case: dict, ptx: str, cubin: bytes) -> dict:
    """Fill case with the PTX target, matrix-instruction counts and ok/error."""
    return check_compiled(case, ptx, cubin, _matmul_errors)


def unusable_reason() -> str:
    """Why this process cannot compile Triton kernels ("" when it can)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return "TRITON_INTERPRET is set: run this check in a process without it"
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton (with its NVIDIA backend) does not import: {exc}"
    try:
        path = get_ptxas(90).path
    except Exception as exc:  # triton raises a plain RuntimeError when no ptxas is found
        return f"no ptxas found by triton: {exc}"
    if not path or not os.path.exists(path):
        return f"no ptxas found by triton (looked for {path!r})"
    return ""


def report(results: list[dict] | None, as_json: bool, format_row) -> int:
    """Print the compile results (one JSON list, or format_row(result) + its status per line) and
    return the exit code; results None means triton is unusable here (the reason is printed)."""
    if results is None:
        print(f"UNUSABLE: {unusable_reason()}")
        return EXIT_UNUSABLE
    if as_json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{format_row(r)}  {'ok' if r['ok'] else 'FAILED: ' + str(r.get('error'))}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4], choices=[2, 3, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(_TORCH_TO_TRITON))
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    results = None if unusable_reason() else compile_all(args.arch, args.bits, args.dtypes)
    return report(results, args.json, lambda r: (
        f"{r['kernel']:5s} {r['bits']}-bit {r['dtype']:9s} target={r.get('target')} "
        f"wgmma={r.get('wgmma', 0)} mma={r.get('mma', 0)} cubin={r.get('cubin_bytes', 0)}B"))


if __name__ == "__main__":
    sys.exit(main())
