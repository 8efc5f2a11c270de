"""Packed 3/4-bit matmul against dense and quantized peers on Whisper and Moonshine layer shapes.

CPU (always): for every layer shape, row count M, thread count and activation dtype it times, in
one run,
  ours 4b / 3b   fade_kernels.ops.cpu.cpu_forward_packed, path "auto" (the fused kernel up to
                 fused_max_m(dtype), else dequant + dense GEMM); for M >= --dequant-from also the
                 dequant + GEMM path on its own
  fp32           F.linear, fp32 activations and weight
  bf16           F.linear, bf16 activations and weight
  int8-dyn       torch.ao.quantization.quantize_dynamic(nn.Linear, qint8) (fbgemm / x86)
  aten-int4      torch.ops.aten._weight_int4pack_mm_for_cpu, 4-bit, same group size (the faster
                 of fp32 and bf16 activations; weights from _convert_weight_to_int4pack_for_cpu)
and reports ms, GB/s (bytes of packed weight + metadata our kernel reads / time), that as a % of
the machine's copy bandwidth measured at the start (STREAM convention: read + write bytes of a
large copy / time, per thread count), and our speedup over every baseline. The read-only
bandwidth (a large sum) is measured too: a GEMV only reads, so it can pass 100% of the copy
figure, and the summary uses it for the ceiling of a speedup over a peer: the peer's measured
time / (the bytes we read / read bandwidth), the most any kernel reading our bytes could get.

GPU (when torch sees a CUDA device): the "triton" backend (split-K GEMV / tl.dot GEMM) and the
"cuda" decode GEMV (M <= 8) on the same shapes with fp16 activations, against fp16 F.linear
(cuBLAS), timed with CUDA events; skipped with the reason otherwise.

Summary block: the layer-level targets, checked on this run's numbers, PASS / FAIL with values:
  M = 1, large-v3 1280->5120 and 5120->1280, fp32 activations, 2 threads (or the most measured):
    4-bit >= 70% of copy bandwidth; >= 5x fp32 F.linear; >= 2x int8-dyn; >= 2x aten-int4;
    3-bit faster than 4-bit
  M = 1500, every large-v3 shape and activation dtype measured: ours <= 1.0x the dense GEMM of
    the same activation dtype (fp32 F.linear for fp32, bf16 F.linear for bf16)

Weights are cold by default (each method cycles through copies of its weights totalling >= 3x
the L3 cache; --hot to disable). Each timing is a per-call median over individually timed calls;
with 2 threads every series first sleeps --settle seconds (see _common.bench). The group size is
--group-size where it divides K, else the largest of 64, 32 that does (Moonshine's K = 288 and
416 take 32); the row says which.

  python benchmarks/bench_qmatmul.py --json runs/bench_qmatmul.json --md runs/bench_qmatmul.md
      # full table: 7 models x 3-4 shapes x 5 M x 2 threads x 2 dtypes (a couple of hours on 2 cores)
  python benchmarks/bench_qmatmul.py --quick       # the target shapes and two others, 2 threads (~15 min)
  python benchmarks/bench_qmatmul.py --models whisper-large-v3 --m 1 --threads 2 --act fp32

Decode rows (--decode): M = 1 on large-v3, tiny and base fc1/fc2 (1280->5120, 5120->1280, 384->1536,
1536->384, 512->2048, 2048->512), 1 and 2 threads, hot weights (one copy, cache-resident) and cold
(the kernel on copies of the repack rotated through COLD_BYTES), 4 and 3 bits:
  QuantLinear µs   QuantLinear.from_linear(nn.Linear(K, N), bits, group_size=128) called as a user
                   calls it (layer(x) under torch.inference_mode), hot only
  kernel µs        the extension call alone (fade_kernels._C.qmatmul on the layer's cached repack)
  int8-dyn, fp32   torch.ao.quantization.quantize_dynamic(nn.Linear) and fp32 F.linear
  read roofline    bytes the kernel reads / the measured read-only bandwidth
with the M = 1 targets checked (hot: 4-bit >= 2x int8-dyn and 3-bit <= 0.85x 4-bit on large-v3 and
tiny; cold: >= 85% of the read bandwidth at 2 threads on large-v3; QuantLinear <= kernel + 10 µs).
  python benchmarks/bench_qmatmul.py --decode --json runs/decode.json --md runs/decode.md
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _common import (TIMING, bench, configure_timing, copies_for, copy_bandwidth, effective_group, machine_info,
                     machine_line, make_aten_int4, make_dense, make_int8_dynamic, make_ours, ours_bytes,
                     random_gptq_tensors, read_bandwidth, rotating, publish)
from fade_kernels.ops import cpu
from fade_kernels.ops.registry import BACKENDS

MODELS = {  # name -> (family, d_model, ffn width)
    "whisper-tiny": ("whisper", 384, 1536),
    "whisper-base": ("whisper", 512, 2048),
    "whisper-small": ("whisper", 768, 3072),
    "whisper-medium": ("whisper", 1024, 4096),
    "whisper-large-v3": ("whisper", 1280, 5120),
    "moonshine-tiny": ("moonshine", 288, 1152),
    "moonshine-base": ("moonshine", 416, 1664),
}

TARGET_MODEL = "whisper-large-v3"
TARGET_SHAPES = [(1280, 5120), (5120, 1280)]  # (K, N) of fc1 and fc2
TARGETS = {"pct_copy_bw": 70.0, "vs_fp32": 5.0, "vs_int8": 2.0, "vs_int4": 2.0, "large_m_ratio": 1.0}

# --quick: the target shapes, one small Whisper and one Moonshine shape (awkward K = 288, group 32).
QUICK = {"models": {"whisper-large-v3": [(1280, 5120), (5120, 1280)], "whisper-tiny": [(384, 1536)],
                    "moonshine-tiny": [(288, 288)]},
         "m": [1, 16, 1500]}
# --tiny: a seconds-long run for the smoke test (not a measurement).
TINY = {"models": {"tiny-a": [(128, 96)], "tiny-b": [(96, 64)]}, "m": [1, 3]}

ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """[(layer names, K in, N out)] of one model, one entry per distinct shape.

    Whisper: q/k/v/o (self and cross attention) d->d, fc1 d->ffn, fc2 ffn->d.
    Moonshine: q/k/v/o d->d, encoder fc1 d->ffn, decoder fc1 d->2*ffn (gated), fc2 ffn->d.
    """
    family, d, ffn = MODELS[model]
    shapes = [(f"qkvo {d}->{d}", d, d), (f"fc1 {d}->{ffn}", d, ffn)]
    if family == "moonshine":
        shapes.append((f"dec fc1 {d}->{2 * ffn}", d, 2 * ffn))
    shapes.append((f"fc2 {ffn}->{d}", ffn, d))
    return shapes


# ---- CPU ------------------------------------------------------------------------------------

def measure_case(k: int, n: int, m: int, threads: int, args, l3: int) -> dict:
    """Baselines for one (shape, M, threads): {"ms": {name: ms}, "aten_int4_act": dtype name}."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(m * 7919 + k)
    x = torch.randn(m, k, generator=gen)
    group = effective_group(k, args.group_size)
    base, t_int4 = {}, {}
    base["fp32"] = bench(make_dense(k, n, torch.float32, copies_for(n * k * 4, l3, args.hot), x), args.rounds,
                         args.target_s)
    base["bf16"] = bench(make_dense(k, n, torch.bfloat16, copies_for(n * k * 2, l3, args.hot), x), args.rounds,
                         args.target_s)
    base["int8-dyn"] = bench(make_int8_dynamic(k, n, copies_for(n * k, l3, args.hot), x), args.rounds, args.target_s)
    for name, dt in ACT_DTYPES.items():
        t_int4[name] = bench(make_aten_int4(k, n, group, copies_for(n * k // 2, l3, args.hot), x, dt), args.rounds,
                             args.target_s)
    best = min(t_int4, key=t_int4.get)
    base["aten-int4"] = t_int4[best]
    return {"x": x, "group": group, "base": base, "aten_int4_act": best}


def measure_ours(k: int, n: int, x: torch.Tensor, bits: int, group: int, act: str, args, l3: int) -> dict:
    """Our kernel for one (shape, M, threads, bits, activation dtype): {ms, bytes, path, dequant_ms}."""
    xa = x.to(ACT_DTYPES[act])
    nbytes = ours_bytes(k, n, bits, group)
    copies = copies_for(nbytes, l3, args.hot)
    fn, nbytes = make_ours(k, n, bits, group, copies, xa)
    t = bench(fn, args.rounds, args.target_s)
    fused = cpu.auto_kernel(x.shape[0], xa.dtype) != "dense"
    t_deq = None
    if x.shape[0] >= args.dequant_from:
        t_deq = t if not fused else bench(make_ours(k, n, bits, group, copies, xa, path="dequant")[0], args.rounds,
                                          args.target_s)
    return {"s": t, "bytes": nbytes, "path": "fused" if fused else "dequant+gemm", "dequant_s": t_deq}


def run_cpu(args, models: dict, info: dict) -> list[dict]:
    """All CPU rows (one per model, shape, M, threads, activation dtype, bits)."""
    l3 = info["l3_bytes"]
    copy_bw = info["copy_gbps"]
    rows = []
    for model, shapes in models.items():
        for layer, k, n in shapes:
            for threads in args.threads:
                for m in args.m:
                    case = measure_case(k, n, m, threads, args, l3)
                    base = case["base"]
                    for act in args.act:
                        dense_same = base["bf16" if act == "bf16" else "fp32"]
                        for bits in args.bits:
                            ours = measure_ours(k, n, case["x"], bits, case["group"], act, args, l3)
                            t = ours["s"]
                            gbps = ours["bytes"] / t / 1e9
                            row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "threads": threads,
                                   "bits": bits, "group_size": case["group"], "act": act, "path": ours["path"],
                                   "ms": t * 1e3, "weight_bytes": ours["bytes"], "gbps": gbps,
                                   "pct_copy_bw": 100 * gbps / copy_bw[threads],
                                   "baseline_ms": {name: v * 1e3 for name, v in base.items()},
                                   "aten_int4_act": case["aten_int4_act"],
                                   "speedup": {name: v / t for name, v in base.items()},
                                   "over_dense_same_dtype": t / dense_same,
                                   "dequant_ms": None if ours["dequant_s"] is None else ours["dequant_s"] * 1e3,
                                   "dequant_over_dense": None if ours["dequant_s"] is None
                                   else ours["dequant_s"] / dense_same}
                            rows.append(row)
                            print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    sp = r["speedup"]
    deq = "" if r["dequant_ms"] is None else f"{r['dequant_ms']:.2f} ({r['dequant_over_dense']:.2f}x)"
    return (f"| {r['model']} {r['layer']} | {r['M']} | {r['threads']} | {r['act']} | {r['bits']} | "
            f"g{r['group_size']} | {r['path']} | {r['ms']:.3f} | {r['gbps']:.1f} | {r['pct_copy_bw']:.0f}% | "
            f"{sp['fp32']:.2f}x | {sp['bf16']:.2f}x | {sp['int8-dyn']:.2f}x | {sp['aten-int4']:.2f}x | "
            f"{r['over_dense_same_dtype']:.2f} | {r['baseline_ms']['fp32']:.3f} | {deq} |")


CPU_HEADER = ("| layer | M | thr | act | bits | group | path | ms | GB/s | % copy BW | vs fp32 | vs bf16 | "
              "vs int8-dyn | vs aten-int4 | ours / dense same dtype | fp32 ms | dequant+GEMM ms (/ dense) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# ---- targets --------------------------------------------------------------------------------

_OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


def _check(name: str, value: float | None, op: str, target: float, detail: str) -> dict:
    """One target: PASS when `value op target`, "n/a" when value is None (not measured)."""
    status = "n/a" if value is None else "PASS" if _OPS[op](value, target) else "FAIL"
    return {"name": name, "value": value, "op": op, "target": target, "status": status, "detail": detail}


def summarize(rows: list[dict], threads_measured: list[int], read_gbps: dict | None = None) -> dict:
    """The layer-level targets on this run's rows; a check is "n/a" when its rows were not measured.
    read_gbps: {threads: read-only GB/s}; when given, the peer checks state their ceiling."""
    threads = 2 if 2 in threads_measured else max(threads_measured)
    checks = []

    def find(k, n, m, bits, act):
        for r in rows:
            if (r["model"], r["K"], r["N"], r["M"], r["threads"], r["bits"], r["act"]) == \
                    (TARGET_MODEL, k, n, m, threads, bits, act):
                return r
        return None

    for k, n in TARGET_SHAPES:
        shape = f"{TARGET_MODEL} {k}->{n}, M=1, fp32 act, {threads} thr"
        r4, r3 = find(k, n, 1, 4, "fp32"), find(k, n, 1, 3, "fp32")
        sp = r4["speedup"] if r4 else {}
        detail4 = "" if r4 is None else (
            f"4-bit {r4['ms']:.3f} ms, {r4['gbps']:.1f} GB/s; fp32 {r4['baseline_ms']['fp32']:.3f} ms, "
            f"int8-dyn {r4['baseline_ms']['int8-dyn']:.3f} ms, aten-int4 {r4['baseline_ms']['aten-int4']:.3f} ms")
        checks.append(_check(f"{shape}: 4-bit % of copy bandwidth", r4 and r4["pct_copy_bw"],
                             ">=", TARGETS["pct_copy_bw"], detail4))
        checks.append(_check(f"{shape}: 4-bit speedup over fp32 F.linear", sp.get("fp32"), ">=", TARGETS["vs_fp32"],
                             detail4))

        def ceiling(peer):
            # The speedup over `peer` of an ideal kernel reading our bytes at the read roofline.
            if r4 is None or not read_gbps or threads not in read_gbps:
                return ""
            ideal_ms = r4["weight_bytes"] / (read_gbps[threads] * 1e9) * 1e3
            return (f"; ceiling at the read roofline ({read_gbps[threads]:.1f} GB/s): "
                    f"{r4['baseline_ms'][peer] / ideal_ms:.2f}x")

        checks.append(_check(f"{shape}: 4-bit speedup over int8-dyn", sp.get("int8-dyn"), ">=", TARGETS["vs_int8"],
                             detail4 + ceiling("int8-dyn")))
        checks.append(_check(f"{shape}: 4-bit speedup over aten-int4", sp.get("aten-int4"), ">=", TARGETS["vs_int4"],
                             detail4 + ceiling("aten-int4")))
        ratio = r3["ms"] / r4["ms"] if (r3 and r4) else None
        checks.append(_check(f"{shape}: 3-bit time / 4-bit time (< 1: 3-bit faster)", ratio, "<", 1.0,
                             "" if ratio is None else f"3-bit {r3['ms']:.3f} ms, 4-bit {r4['ms']:.3f} ms"))
    large = [r for r in rows if r["model"] == TARGET_MODEL and r["M"] == 1500 and r["threads"] == threads]
    for r in large:
        dense = "bf16" if r["act"] == "bf16" else "fp32"
        checks.append(_check(
            f"{TARGET_MODEL} {r['K']}->{r['N']}, M=1500, {r['act']} act, {threads} thr, {r['bits']}-bit: "
            f"ours / {dense} F.linear", r["over_dense_same_dtype"], "<=", TARGETS["large_m_ratio"],
            f"ours {r['ms']:.2f} ms ({r['path']}), {dense} F.linear {r['baseline_ms'][dense]:.2f} ms"))
    if not large:
        checks.append(_check(f"{TARGET_MODEL}, M=1500, {threads} thr: ours / dense GEMM of the same dtype", None, "<=",
                             TARGETS["large_m_ratio"], "not measured in this run"))
    measured = [c for c in checks if c["status"] != "n/a"]
    return {"threads": threads, "checks": checks, "n_pass": sum(c["status"] == "PASS" for c in checks),
            "n_fail": sum(c["status"] == "FAIL" for c in checks), "n_not_measured": len(checks) - len(measured),
            "all_pass": bool(measured) and all(c["status"] == "PASS" for c in measured)}


def format_summary(summary: dict) -> str:
    note = "" if summary["threads"] == 2 else " (they are defined at 2 threads, which this run did not measure)"
    lines = [f"Targets ({summary['threads']} threads{note}): {summary['n_pass']} PASS, "
             f"{summary['n_fail']} FAIL, {summary['n_not_measured']} not measured", ""]
    for c in summary["checks"]:
        value = "not measured" if c["value"] is None else f"{c['value']:.2f}"
        detail = f" ({c['detail']})" if c["detail"] else ""
        lines.append(f"- {c['status']} {c['name']}: {value} (target {c['op']} {c['target']:g}){detail}")
    return "\n".join(lines)


# ---- decode (M = 1) through QuantLinear ------------------------------------------------------

DECODE_SHAPES = {"whisper-large-v3": [(1280, 5120), (5120, 1280)], "whisper-tiny": [(384, 1536), (1536, 384)],
                 "whisper-base": [(512, 2048), (2048, 512)]}
DECODE_TARGET_MODELS = ("whisper-large-v3", "whisper-tiny")
DECODE_TARGETS = {"vs_int8": 2.0, "bits3_over_4": 0.85, "pct_read_bw_cold": 85.0, "call_overhead_us": 10.0}


COLD_BYTES = 512 << 20
"""Working set of the cold decode rows: weights rotated through at least this many bytes (more than
this machine's whole L3, not only a 2-core slice of it)."""


def _decode_layer(k: int, n: int, bits: int):
    """A QuantLinear as a user builds it: from_linear(nn.Linear(K, N)), group 128 (or the largest that divides K)."""
    from fade_kernels.nn.quant_linear import QuantLinear

    return QuantLinear.from_linear(torch.nn.Linear(k, n), bits=bits, group_size=effective_group(k, 128))


def _kernel_calls(layer, x, copies: int):
    """The extension call alone (what QuantLinear.__call__ ends in) on `copies` copies of the layer's repack."""
    packed = cpu._cached_repack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    int8 = cpu.auto_kernel(x.shape[0], x.dtype) == "int8"
    words_q8 = cpu._words_q8(packed) if int8 else None
    calls = []
    for i in range(copies):
        def clone(t):
            return t if i == 0 or t is None else t.clone()
        args = (x, clone(packed["words"]), clone(packed["scales"]), clone(packed["zeros"]), clone(packed["dsum"]),
                layer.bias, packed["bits"], packed["kernel_group"], packed["out_features"], "auto",
                cpu.fused_max_m(x.dtype), 0, clone(words_q8))
        calls.append(lambda args=args: cpu._C.qmatmul(*args))
    return rotating(lambda i: calls[i], copies)


def run_decode(args, info: dict) -> list[dict]:
    """M = 1 rows: per shape, thread count, hot/cold weights and bit width: QuantLinear.__call__ (hot),
    the kernel alone, torch dynamic int8, fp32 F.linear and the read-bandwidth roofline."""
    l3 = info["l3_bytes"]
    rows = []
    for model, shapes in DECODE_SHAPES.items():
        for k, n in shapes:
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(k + n))
            layers = {bits: _decode_layer(k, n, bits) for bits in (4, 3)}
            for threads in args.threads:
                torch.set_num_threads(threads)
                for hot in (True, False):
                    fp32 = bench(make_dense(k, n, torch.float32, copies_for(n * k * 4, l3, hot), x), args.rounds,
                                 args.target_s)
                    int8 = bench(make_int8_dynamic(k, n, copies_for(n * k, l3, hot), x), args.rounds, args.target_s)
                    by_bits = {}
                    for bits, layer in layers.items():
                        nbytes = ours_bytes(k, n, bits, effective_group(k, 128))
                        copies = 1 if hot else math.ceil(COLD_BYTES / nbytes)
                        with torch.inference_mode():
                            t_layer = bench(lambda: layer(x), args.rounds, args.target_s) if hot else None
                            t_kernel = bench(_kernel_calls(layer, x, copies), args.rounds, args.target_s)
                        t = t_layer if hot else t_kernel
                        read = info["read_gbps"][threads]
                        row = {"model": model, "K": k, "N": n, "threads": threads, "weights": "hot" if hot else "cold",
                               "bits": bits, "layer_us": None if t_layer is None else t_layer * 1e6,
                               "kernel_us": t_kernel * 1e6,
                               "overhead_us": None if t_layer is None else (t_layer - t_kernel) * 1e6,
                               "int8_dyn_us": int8 * 1e6, "fp32_us": fp32 * 1e6,
                               "roofline_us": nbytes / (read * 1e9) * 1e6, "weight_bytes": nbytes,
                               "gbps": nbytes / t / 1e9, "pct_read_bw": 100 * nbytes / t / 1e9 / read,
                               "vs_int8_dyn": int8 / t, "vs_fp32": fp32 / t}
                        by_bits[bits] = row
                        rows.append(row)
                    by_bits[3]["bits3_over_4"] = (by_bits[3]["layer_us"] or by_bits[3]["kernel_us"]) / \
                        (by_bits[4]["layer_us"] or by_bits[4]["kernel_us"])
                    for bits in (4, 3):
                        print(format_decode_row(by_bits[bits]), flush=True)
    return rows


def format_decode_row(r: dict) -> str:
    ratio = f"{r['bits3_over_4']:.2f}" if "bits3_over_4" in r else ""
    layer = "" if r["layer_us"] is None else f"{r['layer_us']:.1f}"
    overhead = "" if r["overhead_us"] is None else f"{r['overhead_us']:+.1f}"
    return (f"| {r['model']} {r['K']}->{r['N']} | {r['threads']} | {r['weights']} | {r['bits']} | {layer} | "
            f"{r['kernel_us']:.1f} | {overhead} | {r['int8_dyn_us']:.1f} | {r['fp32_us']:.1f} | "
            f"{r['roofline_us']:.1f} | {r['pct_read_bw']:.0f}% | {r['vs_int8_dyn']:.2f}x | {r['vs_fp32']:.1f}x | {ratio} |")


DECODE_HEADER = ("| layer | thr | weights | bits | QuantLinear µs (hot) | kernel µs | call overhead µs | int8-dyn µs | "
                 "fp32 µs | read roofline µs | % read BW | vs int8-dyn | vs fp32 | 3-bit / 4-bit |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summarize_decode(rows: list[dict]) -> list[dict]:
    """The M = 1 targets on decode rows (times through QuantLinear.__call__)."""
    checks = []
    for r in rows:
        name = f"{r['model']} {r['K']}->{r['N']}, M=1, {r['threads']} thr, {r['weights']}"
        if r["model"] in DECODE_TARGET_MODELS and r["weights"] == "hot" and r["bits"] == 4:
            checks.append(_check(f"{name}: 4-bit speedup over int8-dyn", r["vs_int8_dyn"], ">=",
                                 DECODE_TARGETS["vs_int8"], f"{r['layer_us']:.1f} µs vs {r['int8_dyn_us']:.1f} µs"))
        if r["model"] in DECODE_TARGET_MODELS and r["weights"] == "hot" and r["bits"] == 3:
            checks.append(_check(f"{name}: 3-bit time / 4-bit time", r["bits3_over_4"], "<=",
                                 DECODE_TARGETS["bits3_over_4"], ""))
        if r["model"] == "whisper-large-v3" and r["weights"] == "cold" and r["threads"] == 2:
            checks.append(_check(f"{name}, {r['bits']}-bit kernel: % of read bandwidth", r["pct_read_bw"], ">=",
                                 DECODE_TARGETS["pct_read_bw_cold"], f"{r['gbps']:.1f} GB/s"))
        if r["overhead_us"] is not None:
            checks.append(_check(f"{name}, {r['bits']}-bit: QuantLinear.__call__ - kernel (µs)", r["overhead_us"],
                                 "<=", DECODE_TARGETS["call_overhead_us"],
                                 f"{r['layer_us']:.1f} vs {r['kernel_us']:.1f} µs"))
    return checks


# ---- GPU ------------------------------------------------------------------------------------

def gpu_time(fn, iters: int, device: torch.device) -> float:
    """Seconds per call: median of `iters` calls, each timed by CUDA events (perf_counter on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy GB/s (read + write bytes / time), median of 10 event-timed copies."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = gpu_time(lambda: dst.copy_(src), 10, device)
    return 2 * nbytes / t / 1e9


def gpu_status() -> dict:
    """{"available": bool, "reason": str, "backends": {name: why unavailable or ""}}."""
    backends = {name: ("" if BACKENDS[name].available else BACKENDS[name].why_unavailable)
                for name in ("triton", "cuda") if name in BACKENDS}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device (torch.cuda.is_available() is False)",
                "backends": backends}
    return {"available": True, "reason": "", "backends": backends}


def run_gpu(args, models: dict, device: torch.device, backends: tuple[str, ...], copy_gbps: float,
            l2_bytes: int) -> list[dict]:
    """GPU rows: each available backend in `backends` against fp16 F.linear, fp16 activations.

    Backends are called directly (triton_forward / cuda_forward), on the checkpoint layout
    (qweight int32 [K*b/32, N], qzeros int32 [G, pad32(N)*b/32], scales fp16 [G, N]).
    device may be "cpu" under TRITON_INTERPRET=1 (the smoke test), where the numbers mean nothing.
    """
    from fade_kernels.ops.cuda import MAX_M as CUDA_MAX_M
    from fade_kernels.ops.cuda import cuda_forward
    from fade_kernels.ops.triton_qmatmul import triton_forward

    fns = {"triton": triton_forward, "cuda": cuda_forward}
    act = torch.float16 if device.type == "cuda" else torch.float32  # the interpreter has no fast fp16
    rows = []
    for model, shapes in models.items():
        for layer, k, n in shapes:
            group = effective_group(k, args.group_size)
            for m in args.m:
                x = torch.randn(m, k, device=device).to(act)
                dense_copies = copies_for(n * k * 2, l2_bytes, args.hot)
                ws = [torch.randn(n, k, device=device).to(act) for _ in range(dense_copies)]
                t_dense = gpu_time(rotating(lambda i: (lambda: F.linear(x, ws[i])), dense_copies), args.gpu_iters,
                                   device)
                del ws
                for bits in args.bits:
                    gen = torch.Generator().manual_seed(bits)
                    nbytes = k * bits // 8 * n + (k // group) * n * 2 + (k // group) * math.ceil(n / 32) * bits * 4
                    copies = copies_for(nbytes, l2_bytes, args.hot)
                    packs = [tuple(t.to(device) for t in random_gptq_tensors(k, n, bits, group, gen))
                             for _ in range(copies)]
                    for name in backends:
                        row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "bits": bits,
                               "group_size": group, "backend": name, "act": str(act).replace("torch.", ""),
                               "dense_ms": t_dense * 1e3}
                        why = "" if device.type != "cuda" else (
                            BACKENDS[name].why_unavailable if not BACKENDS[name].available else "")
                        if not why and name == "cuda" and m > CUDA_MAX_M:
                            why = f"decode kernel takes M <= {CUDA_MAX_M}"
                        if why:
                            row["skipped"] = why
                            rows.append(row)
                            continue
                        fn = fns[name]
                        call = rotating(lambda i: (lambda: fn(x, packs[i][0], packs[i][1], packs[i][2], None, None,
                                                              bits, n)), copies)
                        t = gpu_time(call, args.gpu_iters, device)
                        gbps = nbytes / t / 1e9
                        row.update(ms=t * 1e3, weight_bytes=nbytes, gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps,
                                   speedup_vs_dense=t_dense / t)
                        rows.append(row)
                        print(format_gpu_row(row), flush=True)
                    del packs
    return rows


def format_gpu_row(r: dict) -> str:
    head = f"| {r['model']} {r['layer']} | {r['M']} | {r['bits']} | g{r['group_size']} | {r['backend']} |"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']} | | | | {r['dense_ms']:.4f} |"
    return (f"{head} {r['ms']:.4f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.0f}% | {r['speedup_vs_dense']:.2f}x | "
            f"{r['dense_ms']:.4f} |")


GPU_HEADER = ("| layer | M | bits | group | backend | ms | GB/s | % copy BW | vs dense | dense ms |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


# ---- main -----------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    info = result["machine"]
    copy = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in info["copy_gbps"].items())
    read = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in info.get("read_gbps", {}).items())
    s = result["settings"]
    lines = [
        machine_line(info),
        "",
        f"CPU: copy bandwidth (read+write) {copy}; read-only bandwidth {read or 'not measured'}; "
        f"fused kernel up to M={info['fused_max_m']}; weights "
        f"{'hot (cache-resident)' if s['hot'] else 'cold (rotated beyond 3x L3)'}; per-call {s['stat']}, best of "
        f"{s['repeat']} series, settle {s['settle_s']} s; aten-int4 is the faster of fp32/bf16 activations.",
        "",
        CPU_HEADER,
    ]
    if "decode_rows" in result:
        lines[-1] = DECODE_HEADER
        lines += [format_decode_row(r) for r in result["decode_rows"]]
    else:
        lines += [format_row(r) for r in result["rows"]]
    lines += ["", format_summary(result["summary"]), ""]
    gpu = result["gpu"]
    if gpu["available"]:
        lines += [f"GPU {info.get('gpu', '')}: copy bandwidth {gpu['copy_gbps']:.0f} GB/s, fp16 activations, "
                  "median of CUDA-event-timed calls.", "", GPU_HEADER]
        lines += [format_gpu_row(r) for r in gpu["rows"]]
    else:
        why = "; ".join(f"{name}: {reason}" for name, reason in gpu["backends"].items() if reason)
        lines.append(f"GPU: skipped, {gpu['reason']}" + (f" ({why})" if why else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 128, 1500])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=[3, 4])
    parser.add_argument("--act", nargs="+", default=["fp32", "bf16"], choices=list(ACT_DTYPES),
                        help="activation dtypes of our kernel (the baselines always run fp32 and bf16)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target-s", type=float, default=0.1, help="seconds per round of timed calls")
    parser.add_argument("--dequant-from", type=int, default=128,
                        help="also time the dequant + GEMM path from this M up")
    parser.add_argument("--hot", action="store_true", help="reuse one weight copy (cache-resident)")
    parser.add_argument("--stat", choices=["median", "p20", "min"], default="median")
    parser.add_argument("--repeat", type=int, default=1, help="series per timing; the best one is kept")
    parser.add_argument("--settle", type=float, default=3.0, help="sleep before each multi-threaded series (s)")
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the copy-bandwidth probe")
    parser.add_argument("--gpu-iters", type=int, default=200, help="timed calls per GPU measurement")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when a GPU is present")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU section (GPU only)")
    parser.add_argument("--quick", action="store_true",
                        help="the target shapes, whisper-tiny fc1 and moonshine-tiny qkvo; M 1, 16, 1500; 2 threads")
    parser.add_argument("--decode", action="store_true",
                        help="M = 1 through QuantLinear.__call__ on large-v3, tiny and base fc1/fc2: hot and cold "
                             "weights, --threads (default 1 2); replaces the layer table")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long smoke run on toy shapes, 1 thread (not a measurement)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--md", help="write the markdown report here")
    args = parser.parse_args(argv)
    if sum((args.quick, args.tiny, args.decode)) > 1:
        parser.error("--quick, --tiny and --decode are exclusive")
    return args


def selected_models(args) -> dict:
    """{model: [(layer, K, N)]} for this run."""
    if args.tiny or args.quick:
        preset = TINY if args.tiny else QUICK
        return {model: [(f"{k}->{n}", k, n) for k, n in shapes] for model, shapes in preset["models"].items()}
    return {model: layer_shapes(model) for model in args.models}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        args.m, args.threads, args.rounds, args.target_s = TINY["m"], [1], 1, 0.001
        args.hot, args.settle, args.copy_mb, args.gpu_iters, args.dequant_from = True, 0.0, 8, 3, 3
    elif args.quick:
        args.m, args.threads = QUICK["m"], [2]
    configure_timing(args.stat, args.settle, args.repeat)
    ok, why = cpu.cpu_available()
    if not ok:
        raise SystemExit(f"CPU kernels unavailable: {why}")
    models = selected_models(args)
    info = machine_info()
    print(machine_line(info), flush=True)
    rows, decode_rows = [], []
    info["copy_gbps"], info["read_gbps"] = {}, {}
    if not args.no_cpu:
        info["copy_gbps"] = {t: copy_bandwidth(t, args.copy_mb << 20) for t in args.threads}
        info["read_gbps"] = {t: read_bandwidth(t, args.copy_mb << 20) for t in args.threads}
        print(f"copy bandwidth (GB/s): {info['copy_gbps']}; read-only bandwidth (GB/s): {info['read_gbps']}",
              flush=True)
        if args.decode:
            print(DECODE_HEADER, flush=True)
            decode_rows = run_decode(args, info)
        else:
            print(CPU_HEADER, flush=True)
            rows = run_cpu(args, models, info)
    summary = summarize(rows, args.threads, info["read_gbps"])
    if args.decode:
        checks = summarize_decode(decode_rows)
        summary = {"threads": max(args.threads), "checks": checks,
                   "n_pass": sum(c["status"] == "PASS" for c in checks),
                   "n_fail": sum(c["status"] == "FAIL" for c in checks), "n_not_measured": 0,
                   "all_pass": all(c["status"] == "PASS" for c in checks)}
    gpu = gpu_status()
    if args.no_gpu and gpu["available"]:
        gpu.update(available=False, reason="--no-gpu")
    if gpu["available"]:
        device = torch.device("cuda")
        gpu["copy_gbps"] = gpu_copy_bandwidth(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        print(GPU_HEADER, flush=True)
        gpu["rows"] = run_gpu(args, models, device, ("triton", "cuda"), gpu["copy_gbps"], l2)
    result = {"machine": info,
              "settings": {"hot": args.hot, "stat": TIMING["stat"], "repeat": TIMING["repeat"],
                           "settle_s": TIMING["settle_s"], "rounds": args.rounds, "group_size": args.group_size,
                           "m": args.m, "threads": args.threads, "bits": args.bits, "act": args.act,
                           "preset": "tiny" if args.tiny else "quick" if args.quick else "full",
                           "argv": sys.argv[1:] if argv is None else list(argv)},
              "rows": rows, "summary": summary, "gpu": gpu}
    if args.decode:
        result["decode_rows"] = decode_rows
        result["settings"]["preset"] = "decode"
        result["settings"]["activations"] = cpu.ACTIVATIONS
    publish(result, markdown(result), args.json, args.md)
    return result


if __name__ == "__main__":
    main()
