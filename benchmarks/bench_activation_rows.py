#!/usr/bin/env python
"""Where the int8-activation kernel pays: fused int8 vs fused fp32 vs the dense GEMM, by row count.

The decoder of an encoder-decoder model calls its linears with M = batch x prompt length rows on
the first step and M = batch rows after it. Whether those calls use int8 or fp32 activations
changes the numbers (and can change a greedy transcript), so the row counts that "auto" sends to
the int8 kernel decide whether a batch transcribes like one utterance at a time. This measures,
in one run, for each layer shape, bit width, thread count and M:

  int8    cpu_forward_packed(x, packed, path="fused", activations="int8")
  fp32    cpu_forward_packed(x, packed, path="fused", activations="fp32")
  dense   F.linear(x, W) with W the layer's fp32 dequantized weight (what path "auto" runs past
          the fused threshold)

with hot weights by default (small Whisper models keep their decoder weights in cache), and
reports microseconds and the ratios int8 / dense and int8 / fp32.

  python benchmarks/bench_activation_rows.py --models whisper-tiny whisper-base --m 1 8 16 32 64 128 --threads 1 2 \\
      --json rows.json --md rows.md
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import (TIMING, bench, configure_timing, copies_for, machine_info, machine_line, publish,
                     random_gptq_tensors, rotating)
from bench_qmatmul import MODELS, layer_shapes
from fade_kernels.ops import cpu
from fade_kernels.ops.reference import dequantize_weight

def time_layer(k: int, n: int, bits: int, group_size: int, m: int, l3: int, hot: bool, rounds: int) -> dict:
    """Seconds per call of the three paths on one random layer of shape [N, K] and x float32 [M, K]."""
    gen = torch.Generator().manual_seed(1000 * bits + k)
    copies = copies_for(n * k * bits // 8, l3, hot)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    packs, dense = [], []
    for _ in range(copies):
        qweight, qzeros, scales = random_gptq_tensors(k, n, bits, group_size, gen)
        packs.append(cpu.repack_for_cpu(qweight, qzeros, scales, bits, group_size))
        dense.append(dequantize_weight(qweight, qzeros, scales, g_idx, bits, n))   # float32 [N, K]
    x = torch.randn(m, k, generator=gen)
    out = {}
    with torch.inference_mode():
        for name in ("int8", "fp32"):
            out[name] = bench(rotating(lambda i, a=name: (lambda: cpu.cpu_forward_packed(
                x, packs[i], path="fused", activations=a)), copies), rounds)
        out["dense"] = bench(rotating(lambda i: (lambda: F.linear(x, dense[i])), copies), rounds)
    return out


def run(args) -> dict:
    info = machine_info()
    rows = []
    for model in args.models:
        for layer, k, n in layer_shapes(model):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for bits in args.bits:
                    for m in args.m:
                        t = time_layer(k, n, bits, args.group_size, m, info["l3_bytes"], not args.cold, args.rounds)
                        row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "threads": threads,
                               "bits": bits, "us": {name: v * 1e6 for name, v in t.items()},
                               "int8_over_dense": t["int8"] / t["dense"], "int8_over_fp32": t["int8"] / t["fp32"]}
                        rows.append(row)
                        print(format_row(row), flush=True)
    return {"machine": info, "hot": not args.cold, "group_size": args.group_size, "stat": TIMING["stat"],
            "int8_max_m": cpu.INT8_MAX_M, "rows": rows}


def format_row(r: dict) -> str:
    us = r["us"]
    return (f"| {r['model']} {r['layer']} | {r['bits']} | {r['threads']} | {r['M']} | {us['int8']:.1f} | "
            f"{us['fp32']:.1f} | {us['dense']:.1f} | {r['int8_over_dense']:.2f} | {r['int8_over_fp32']:.2f} |")


def markdown(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             f"Weights {'hot (one copy, cache-resident)' if result['hot'] else 'cold (rotated beyond 3x L3)'}, "
             f"g{result['group_size']}, per-call {result['stat']}, one run. INT8_MAX_M = {result['int8_max_m']}.", "",
             "| layer | bits | thr | M | int8 µs | fp32 µs | dense µs | int8 / dense | int8 / fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(r) for r in result["rows"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["whisper-tiny", "whisper-base"], choices=list(MODELS))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=[3, 4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="rotate weight copies beyond 3x the L3 cache")
    parser.add_argument("--stat", choices=["median", "p20", "min"], default="median")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to sleep before each multi-threaded series (see _common.bench)")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args()
    ok, why = cpu.cpu_available()
    if not ok:
        parser.error(f"the CPU kernels are unavailable: {why}")
    if not cpu.int8_native():
        print("note: this CPU runs the int8 kernel in portable C++ (no SIMD int8 family)")
    configure_timing(args.stat, args.settle)
    result = run(args)
    publish(result, markdown(result), args.json, args.md)


if __name__ == "__main__":
    main()
