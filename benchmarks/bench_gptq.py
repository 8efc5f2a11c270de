"""GPTQ solver on the CPU: the fused C++ sweep against the torch column loop, and the whole
`gptq_quantize` (reversed factorisation + fused sweep) against a plain torch GPTQ (three-step
factorisation + torch column loop), on Whisper layer shapes.

    python benchmarks/bench_gptq.py                       # the default tables (several minutes:
                                                          # the torch loop is the slow part)
    python benchmarks/bench_gptq.py --quick               # K = 384 and 1280 only
    python benchmarks/bench_gptq.py --json runs/bench_gptq.json

Part 1, sweep per layer shape (N outputs, K inputs; group 128, asymmetric): the block sweep of
a fixed U, split into the in-block part (what the C++ kernel fuses: per column grid, quantize,
error, update of the block) and the lazy trailing GEMMs (one torch GEMM per block, identical in
both). Codes are checked to be identical.

Part 2, whole solver on one layer (default whisper-large fc1, nn.Linear(1280, 5120): weight
5120 x 1280, and fc2, 1280 x 5120): wall time of `gptq_quantize` with its defaults against
`gptq_quantize(sweep="torch", factor="three_step")`, which is the plain recipe (Cholesky,
cholesky_inverse, Cholesky; Python column loop), plus the factorisations alone and the output
error tr(dW H dW^T) / tr(W H W^T) of both.

Hessians are synthetic but shaped like real ones, and cheap to build at K = 5120: per-channel
scales (log-normal, a few outlier channels), neighbour correlation rho^|i-j| and a rank-32
common component. Ratios come from one run; on a shared machine the absolute times are upper
bounds (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from fade_kernels.config import resolve_group_size
from fade_kernels.solver import gptq
from fade_kernels.solver.factor import inverse_cholesky_upper

SWEEP_SHAPES = [  # (N, K): whisper tiny q/k/v/o and fc1; large q/k/v/o, fc1, fc2
    (384, 384), (1536, 384), (1280, 1280), (5120, 1280), (1280, 5120)]
QUICK_SHAPES = [(384, 384), (1536, 384), (1280, 1280), (5120, 1280)]
LAYER_SHAPES = [(5120, 1280), (1280, 5120)]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = gptq._C.gptq_sweep_best_isa() if gptq.cpp_sweep_available()[0] else "no C++ sweep"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, sweep ISA {isa}, load average {os.getloadavg()[0]:.1f}")


def synthetic_hessian(k: int, gen: torch.Generator, rho: float = 0.6, rank: int = 32) -> torch.Tensor:
    """float32 (K, K) SPD: S (C + V V^T / rank) S with C_ij = rho^|i-j|, V (K, rank) Gaussian,
    S log-normal channel scales with 1% outlier channels x10."""
    idx = torch.arange(k, dtype=torch.float32)
    corr = rho ** (idx[:, None] - idx[None, :]).abs()
    common = torch.randn(k, rank, generator=gen)
    scale = torch.exp(0.5 * torch.randn(k, generator=gen))
    scale[torch.randperm(k, generator=gen)[: max(1, k // 100)]] *= 10
    return scale[:, None] * (corr + common @ common.t() / rank) * scale[None, :]


def timed_sweep(W: torch.Tensor, U: torch.Tensor, bits: int, group_size: int, impl: str,
                block_size: int = 128) -> tuple[float, float, torch.Tensor]:
    """gptq.gptq_sweep's loop with timers: (seconds in blocks, seconds in GEMMs, codes)."""
    n_rows, n_cols = W.shape
    g = resolve_group_size(group_size, n_cols)
    out = gptq.SweepResult(torch.zeros(n_rows, n_cols, dtype=torch.int32), torch.zeros(n_rows, n_cols // g),
                           torch.zeros(n_rows, n_cols // g), torch.zeros(n_rows))
    block = gptq.sweep_block_cpp if impl == "cpp" else gptq._sweep_block_torch
    t_block = t_gemm = 0.0
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        t0 = time.perf_counter()
        Err1 = block(W, U, i1, i2, out, g, bits, False, None)
        t1 = time.perf_counter()
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        t_gemm += time.perf_counter() - t1
        t_block += t1 - t0
    return t_block, t_gemm, out.codes


def bench_sweeps(shapes, bits_list, repeats: int, seed: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    warm_u = inverse_cholesky_upper(synthetic_hessian(256, gen), 0.01).contiguous()
    for impl in ("cpp", "torch"):  # first calls pay for op dispatch set-up and thread start
        timed_sweep(torch.randn(64, 256, generator=gen), warm_u, 4, 128, impl)
    for n, k in shapes:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(n, k, generator=gen) * 0.02
        U = inverse_cholesky_upper(synthetic_hessian(k, gen), 0.01).contiguous()
        for bits in bits_list:
            result = {}
            for impl in ("cpp", "torch"):
                best = None
                # The torch loop takes seconds at K >= 1280: once is enough there, its noise is small.
                for _ in range(repeats if impl == "cpp" or k < 1280 else 1):
                    t_block, t_gemm, codes = timed_sweep(weight.clone(), U, bits, 128, impl)
                    if best is None or t_block + t_gemm < best[0] + best[1]:
                        best = (t_block, t_gemm, codes)
                result[impl] = best
            row = dict(N=n, K=k, bits=bits,
                       torch_block_s=result["torch"][0], cpp_block_s=result["cpp"][0],
                       torch_sweep_s=result["torch"][0] + result["torch"][1],
                       cpp_sweep_s=result["cpp"][0] + result["cpp"][1],
                       identical_codes=bool(torch.equal(result["torch"][2], result["cpp"][2])))
            row["block_speedup"] = row["torch_block_s"] / row["cpp_block_s"]
            row["sweep_speedup"] = row["torch_sweep_s"] / row["cpp_sweep_s"]
            rows.append(row)
            print(f"  sweep {n}x{k} w{bits}: torch {row['torch_sweep_s']:.2f} s, C++ {row['cpp_sweep_s']:.3f} s",
                  flush=True)
    return rows


def output_error(weight: torch.Tensor, result: gptq.GPTQResult, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) for dW = W - W_hat."""
    g = weight.shape[1] // result.scales.shape[1]
    zeros = result.zeros.repeat_interleave(g, 1).float()
    w_hat = (result.codes.float() - zeros) * result.scales.repeat_interleave(g, 1)
    dw = weight - w_hat
    return float(((dw @ hessian) * dw).sum() / ((weight @ hessian) * weight).sum())


def bench_layers(shapes, bits_list, seed: int, repeats: int = 3) -> list[dict]:
    rows = []
    for n, k in shapes:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(n, k, generator=gen) * 0.02
        hessian = synthetic_hessian(k, gen)
        factor_s = {}
        for method in ("reversed", "three_step"):
            factor_s[method] = float("inf")
            for _ in range(2):  # best of two: one call is short enough to be hit by a stall
                t0 = time.perf_counter()
                inverse_cholesky_upper(hessian, 0.01, method=method)
                factor_s[method] = min(factor_s[method], time.perf_counter() - t0)
        for bits in bits_list:
            t_fast = t_plain = float("inf")
            for _ in range(repeats):  # best of `repeats`, alternating, so a stall hits neither side alone
                t0 = time.perf_counter()
                fast = gptq.gptq_quantize(weight, hessian, bits=bits, group_size=128)
                t_fast = min(t_fast, time.perf_counter() - t0)
                t0 = time.perf_counter()
                plain = gptq.gptq_quantize(weight, hessian, bits=bits, group_size=128, sweep="torch",
                                           factor="three_step")
                t_plain = min(t_plain, time.perf_counter() - t0)
            row = dict(N=n, K=k, bits=bits, plain_s=t_plain, fade_s=t_fast, speedup=t_plain / t_fast,
                       factor_three_step_s=factor_s["three_step"], factor_reversed_s=factor_s["reversed"],
                       plain_error=output_error(weight, plain, hessian), fade_error=output_error(weight, fast, hessian),
                       codes_differing=int((plain.codes != fast.codes).sum()))
            rows.append(row)
            print(f"  gptq_quantize {n}x{k} w{bits}: plain {t_plain:.2f} s, fade {t_fast:.2f} s", flush=True)
    return rows


def print_tables(sweeps: list[dict], layers: list[dict], header: str) -> None:
    print(f"\nMachine: {header}\n")
    print("Sweep (group 128, asymmetric): in-block part and whole sweep (in-block + trailing GEMMs)\n")
    print("| N x K | bits | torch in-block s | C++ in-block s | in-block speedup | torch sweep s | C++ sweep s "
          "| sweep speedup | codes identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sweeps:
        print(f"| {r['N']} x {r['K']} | {r['bits']} | {r['torch_block_s']:.3f} | {r['cpp_block_s']:.4f} "
              f"| {r['block_speedup']:.1f}x | {r['torch_sweep_s']:.3f} | {r['cpp_sweep_s']:.3f} "
              f"| {r['sweep_speedup']:.1f}x | {'yes' if r['identical_codes'] else 'NO'} |")
    if not layers:
        return
    print("\nWhole solver: gptq_quantize (reversed factor + C++ sweep) vs plain torch GPTQ (three-step factor + "
          "torch loop), group 128; error = tr(dW H dW^T) / tr(W H W^T)\n")
    print("| N x K | bits | factor 3-step s | factor reversed s | plain GPTQ s | gptq_quantize s | speedup "
          "| plain error | gptq_quantize error | codes differing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in layers:
        print(f"| {r['N']} x {r['K']} | {r['bits']} | {r['factor_three_step_s']:.3f} | {r['factor_reversed_s']:.3f} "
              f"| {r['plain_s']:.2f} | {r['fade_s']:.2f} | {r['speedup']:.1f}x | {r['plain_error']:.5f} "
              f"| {r['fade_error']:.5f} | {r['codes_differing']} |")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxK, e.g. 5120x1280, got {text!r}") from None
    return n, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="sweep shapes NxK (default: Whisper shapes)")
    parser.add_argument("--layers", type=parse_shape, nargs="*", help="whole-solver shapes NxK (default 5120x1280 "
                        "1280x5120; pass none to skip)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the C++ sweep and of both whole solvers (best is kept)")
    parser.add_argument("--quick", action="store_true", help="skip K = 5120 (the torch loop takes minutes there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    available, why = gptq.cpp_sweep_available()
    if not available:
        raise SystemExit(f"the fused C++ sweep is not available: {why}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SWEEP_SHAPES)
    layers = args.layers if args.layers is not None else ([(5120, 1280)] if args.quick else LAYER_SHAPES)

    header = machine()
    print(f"Machine: {header}", flush=True)
    sweeps = bench_sweeps(shapes, args.bits, args.repeats, args.seed)
    layer_rows = bench_layers(layers, args.bits, args.seed, args.repeats)
    print_tables(sweeps, layer_rows, machine())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(machine=header, sweeps=sweeps, layers=layer_rows), f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
