"""Benchmark the CPU quantized matmul (fade_kernels.ops.cpu) on Whisper layer shapes.

For every layer shape, row count M and thread count it times:
  ours-4b / ours-3b   cpu_forward_packed, path "auto" (the fused kernel up to fused_max_m(dtype),
                      else dequant + dense GEMM); for M >= --dequant-from also the dequant + GEMM
                      path on its own, as a ratio to fp32 F.linear
  fp32                F.linear with the fp32 weight
  bf16                F.linear with bf16 activations and weight
  int8-dyn            torch.ao.quantization.quantize_dynamic(nn.Linear, qint8) (fbgemm/x86)
  aten-int4           torch.ops.aten._weight_int4pack_mm_for_cpu, 4-bit g128 (best of fp32 and
                      bf16 activations; weights from _convert_weight_to_int4pack_for_cpu)
and reports ms, GB/s (bytes of the packed weight and metadata the kernel reads / time), that
bandwidth as a % of the measured copy bandwidth, and our speedup over every baseline.

Weights are cold by default: every method cycles through enough copies of its weights to exceed
3x the last-level cache, as in a real model whose layers do not fit in cache (--hot to disable).
Each timing is the median of individually timed calls (the machine may be shared: re-run and
compare).
Copy bandwidth follows the STREAM convention: (bytes read + bytes written) / time of a large
tensor copy, measured here per thread count.

  python benchmarks/bench_qmatmul_cpu.py                      # full table (~10 min on 2 cores)
  python benchmarks/bench_qmatmul_cpu.py --models large-v3 --m 1 --threads 2
  python benchmarks/bench_qmatmul_cpu.py --json out.json --md out.md

The shared machinery (timing, copy bandwidth, baselines) lives in _common.py; bench_qmatmul.py
is the full comparison (every Whisper and Moonshine shape, the targets checked).
"""
from __future__ import annotations

import argparse

import torch

from _common import (TIMING, bench, configure_timing, copies_for, copy_bandwidth, machine_info, make_aten_int4,
                     make_dense, make_int8_dynamic, make_ours, ours_bytes, publish)
from fade_kernels.ops import cpu

SHAPES = {  # model -> [(layer, K in, N out)]
    "tiny": [("qkvo 384->384", 384, 384), ("fc1 384->1536", 384, 1536), ("fc2 1536->384", 1536, 384)],
    "large-v3": [("qkvo 1280->1280", 1280, 1280), ("fc1 1280->5120", 1280, 5120), ("fc2 5120->1280", 5120, 1280)],
}


# ---- main -----------------------------------------------------------------------------------

def run(args) -> dict:
    info = machine_info()
    l3 = info["l3_bytes"]
    copy_bw = {t: copy_bandwidth(t) for t in args.threads}
    info["copy_gbps"] = copy_bw
    rows = []
    for model in args.models:
        for layer, k, n in SHAPES[model]:
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.m:
                    x = torch.randn(m, k)
                    if args.act == "bf16":
                        x = x.bfloat16()
                    base = {}
                    dense_bytes = n * k * 4
                    base["fp32"] = bench(make_dense(k, n, torch.float32, copies_for(dense_bytes, l3, args.hot), x), args.rounds)
                    base["bf16"] = bench(make_dense(k, n, torch.bfloat16, copies_for(dense_bytes // 2, l3, args.hot), x),
                                         args.rounds)
                    base["int8-dyn"] = bench(make_int8_dynamic(k, n, copies_for(n * k, l3, args.hot), x), args.rounds)
                    if k % args.group_size == 0:
                        int4_copies = copies_for(n * k // 2, l3, args.hot)
                        base["aten-int4"] = min(
                            bench(make_aten_int4(k, n, args.group_size, int4_copies, x, dt), args.rounds)
                            for dt in (torch.float32, torch.bfloat16))
                    for bits in args.bits:
                        nbytes = ours_bytes(k, n, bits, args.group_size)
                        copies = copies_for(nbytes, l3, args.hot)
                        fn, nbytes = make_ours(k, n, bits, args.group_size, copies, x)
                        t = bench(fn, args.rounds)
                        gbps = nbytes / t / 1e9
                        fused = cpu.auto_kernel(m, x.dtype) != "dense"
                        t_deq = None
                        if m >= args.dequant_from:
                            t_deq = t if not fused else bench(
                                make_ours(k, n, bits, args.group_size, copies, x, path="dequant")[0], args.rounds)
                        row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "threads": threads, "bits": bits,
                               "group_size": args.group_size, "act": args.act, "path": "fused" if fused else "dequant+gemm",
                               "ms": t * 1e3, "weight_bytes": nbytes, "gbps": gbps,
                               "pct_copy_bw": 100 * gbps / copy_bw[threads],
                               "baseline_ms": {name: v * 1e3 for name, v in base.items()},
                               "speedup": {name: v / t for name, v in base.items()},
                               "dequant_ms": None if t_deq is None else t_deq * 1e3,
                               "dequant_over_dense": None if t_deq is None else
                               t_deq / base["bf16" if args.act == "bf16" else "fp32"]}
                        rows.append(row)
                        print(format_row(row), flush=True)
    return {"machine": info, "hot": args.hot, "act": args.act, "stat": TIMING["stat"], "repeat": TIMING["repeat"],
            "rows": rows}


def format_row(r: dict) -> str:
    sp = r["speedup"]
    int4 = f"{sp['aten-int4']:.2f}x" if "aten-int4" in sp else "n/a"
    deq = "" if r["dequant_ms"] is None else f"{r['dequant_ms']:.2f} ({r['dequant_over_dense']:.2f}x)"
    return (f"| {r['model']} {r['layer']} | {r['M']} | {r['threads']} | {r['bits']} | {r['path']} | {r['ms']:.3f} | "
            f"{r['gbps']:.1f} | {r['pct_copy_bw']:.0f}% | {sp['fp32']:.2f}x | {sp['bf16']:.2f}x | {sp['int8-dyn']:.2f}x | "
            f"{int4} | {r['baseline_ms']['fp32']:.3f} | {deq} |")


def markdown(result: dict) -> str:
    info = result["machine"]
    copy = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in info["copy_gbps"].items())
    lines = [
        f"Machine: {info['cpu']}, torch {info['torch']}, kernels: {info['kernel_isa']}, "
        f"activations {result['act']}, fused up to M={info['fused_max_m']}; copy bandwidth (read+write): {copy}; "
        f"weights {'hot (cache-resident)' if result['hot'] else 'cold (rotated beyond 3x L3)'}; "
        f"per-call {result['stat']}, best of {result['repeat']} series.",
        "",
        "| layer | M | thr | bits | path | ms | GB/s | % copy BW | vs fp32 | vs bf16 | vs int8-dyn | vs aten-int4 | "
        "fp32 ms | dequant+GEMM ms (/ dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [format_row(r) for r in result["rows"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 128, 1500])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=[3, 4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--act", choices=["fp32", "bf16"], default="fp32", help="activation dtype of our kernel")
    parser.add_argument("--dequant-from", type=int, default=128,
                        help="also time the dequant + GEMM path from this M up")
    parser.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident)")
    parser.add_argument("--stat", choices=["median", "p20", "min"], default="median",
                        help="per-call statistic; p20/min filter calls stalled by other processes on a shared machine")
    parser.add_argument("--repeat", type=int, default=1, help="series per timing; the best one is kept")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to sleep before each multi-threaded series (see bench())")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args()
    configure_timing(args.stat, args.settle, args.repeat)
    ok, why = cpu.cpu_available()
    if not ok:
        raise SystemExit(f"CPU kernels unavailable: {why}")
    result = run(args)
    publish(result, markdown(result), args.json, args.md)


if __name__ == "__main__":
    main()
