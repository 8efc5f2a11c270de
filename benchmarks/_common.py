"""Shared machinery of the layer benchmarks (bench_qmatmul_cpu.py, bench_qmatmul.py, bench_e2e.py).

Not a test helper and not part of the package: the scripts run as `python benchmarks/<name>.py`,
which puts this folder on sys.path, so they import it as `_common`.

  machine_info()       the machine's name and what the kernels will use (CPU model, L3, ISA flags)
  copy_bandwidth(t)    STREAM-style copy GB/s with t threads (the roofline convention of the targets)
  read_bandwidth(t)    read-only GB/s with t threads (what a GEMV streaming its weights can reach)
  bench(fn, rounds)    seconds per call: a per-call statistic over individually timed calls
  copies_for/rotating  "cold" weights: cycle through enough copies to exceed 3x the L3 cache
  make_ours/make_dense/make_int8_dynamic/make_aten_int4
                       zero-argument callables for one layer shape and activation x, cycling
                       through `copies` weight copies
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch
import torch.nn.functional as F

from fade_kernels.ops import cpu
from fade_kernels.packing import pack_qweight, pack_qzeros

# ---- machine --------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, L3 bytes, ISA flags, threads, torch version, our kernel ISA and fused thresholds."""
    info = {"cpu": platform.processor() or platform.machine(), "l3_bytes": 32 << 20}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key.strip() == "Model name":
                info["cpu"] = value
            elif key.strip() == "L3 cache":  # e.g. "32 MiB (1 instance)"
                num, unit = value.split()[:2]
                info["l3_bytes"] = int(float(num) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}.get(unit, 1))
            elif key.strip() == "Flags":
                flags = set(value.split())
                info["avx512f"] = "avx512f" in flags
                info["avx2"] = "avx2" in flags
                info["avx512_bf16"] = "avx512_bf16" in flags
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    info["platform"] = platform.platform()
    info["logical_cpus"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)  # MemTotal in KiB
    except (OSError, ValueError, IndexError):
        pass
    info["cores"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    ok, why = cpu.cpu_available()
    info["kernel_isa"] = cpu.cpu_isa() if ok else f"unavailable ({why})"
    info["fused_max_m"] = {"float32": cpu.FUSED_MAX_M, "bfloat16": cpu.FUSED_MAX_M_BF16}
    info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine, for the top of a markdown report."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ", no GPU"
    mem = f", {info['mem_gib']} GiB" if "mem_gib" in info else ""
    return (f"Machine: {info['cpu']} ({info.get('logical_cpus')} logical CPUs{mem}{gpu}), {info['platform']}, "
            f"torch {info['torch']}, our CPU kernels: {info['kernel_isa']}, "
            f"load average at start {info['load_average_1min']}")


def copy_bandwidth(threads: int, nbytes: int = 512 << 20) -> float:
    """STREAM-style copy bandwidth in GB/s: (read + write bytes) / time, best of 10."""
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def read_bandwidth(threads: int, nbytes: int = 512 << 20) -> float:
    """Read-only bandwidth in GB/s: bytes of a large float32 sum / time, best of 10. A decode GEMV
    only reads its weights, so this, not the copy figure, is the ceiling of its GB/s."""
    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    src.sum()
    best = math.inf
    for _ in range(10):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


# ---- timing ---------------------------------------------------------------------------------

TIMING = {"stat": "median", "settle_s": 3.0, "repeat": 1}
"""How bench() times: per-call statistic, sleep before each multi-threaded series, series per timing."""


def configure_timing(stat: str = "median", settle_s: float = 3.0, repeat: int = 1) -> None:
    """Set TIMING (see bench()). stat: "median", "p20" or "min"."""
    if stat not in ("median", "p20", "min"):
        raise ValueError(f"stat must be 'median', 'p20' or 'min', got {stat!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    TIMING.update(stat=stat, settle_s=float(settle_s), repeat=int(repeat))


def bench(fn, rounds: int, target_s: float = 0.1) -> float:
    """Seconds per call: the best over TIMING["repeat"] series of a per-call statistic
    (TIMING["stat"]: median, 20th percentile or min) over >= rounds * target_s of individually
    timed calls (at least 3 * rounds calls).

    Each call is timed on its own: on a shared machine a 2-thread call can wait whole scheduler
    ticks (4-24 ms) for a descheduled OpenMP worker, and a mean would report those.
    With more than one thread, each series first sleeps TIMING["settle_s"]: after a CPU-heavy
    series (a 1500-row GEMM, the copy-bandwidth probe) the scheduler makes the OpenMP worker wait
    behind other processes for seconds (~8 ms per call, measured), and a short sleep resets that.
    """
    return min(_series(fn, rounds, target_s) for _ in range(TIMING["repeat"]))


def _series(fn, rounds: int, target_s: float) -> float:
    if TIMING["settle_s"] > 0 and torch.get_num_threads() > 1:
        time.sleep(TIMING["settle_s"])
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    calls = max(3 * rounds, int(rounds * target_s / once))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if TIMING["stat"] == "p20":
        return sorted(times)[len(times) // 5]
    if TIMING["stat"] == "min":
        return min(times)
    return statistics.median(times)


def copies_for(nbytes: int, l3: int, hot: bool) -> int:
    """How many weight copies to cycle through so the working set is >= 3x the L3 cache."""
    return 1 if hot else max(1, min(64, math.ceil(3 * l3 / max(nbytes, 1))))


def rotating(make_call, copies: int):
    """A zero-argument function that calls make_call(i) for i = 0, 1, ... copies-1, 0, ..."""
    calls = [make_call(i) for i in range(copies)]
    state = [0]

    def run():
        i = state[0]
        state[0] = (i + 1) % copies
        return calls[i]()
    return run


# ---- methods --------------------------------------------------------------------------------

def effective_group(k: int, requested: int) -> int:
    """`requested` when it divides K, else the largest of 64, 32 that does (Moonshine's K = 288, 416 take 32)."""
    for g in (requested, 64, 32):
        if g <= k and k % g == 0:
            return g
    raise ValueError(f"no group size in ({requested}, 64, 32) divides K={k}; K must be a multiple of 32")


def ours_bytes(k: int, n: int, bits: int, group_size: int) -> int:
    """Bytes of the CPU layout: words int32 [T, K*b/32, 32] + scales fp16 + zeros uint8 [T, G, 32].

    (The int16 D sums, 2 more bytes per group and column, are not counted: the fused kernel reads
    them, so GB/s is slightly understated.)
    """
    cols = math.ceil(n / cpu.TILE_N) * cpu.TILE_N
    return cols * (k * bits // 32 * 4 + k // group_size * 3)


def random_gptq_tensors(k: int, n: int, bits: int, group_size: int, gen: torch.Generator):
    """Random packed GPTQ tensors of one layer: (qweight int32 [K*b/32, N],
    qzeros int32 [G, pad32(N)*b/32], scales float16 [G, N]), G = K / group_size."""
    groups = k // group_size
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2 ** bits, (n, groups), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.01).half()
    return pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales


def make_ours(k: int, n: int, bits: int, group_size: int, copies: int, x: torch.Tensor, path: str = "auto"):
    """(callable, bytes read per call): cpu_forward_packed on `copies` random CPU-layout weights."""
    gen = torch.Generator().manual_seed(bits)
    packs = []
    for _ in range(copies):
        qweight, qzeros, scales = random_gptq_tensors(k, n, bits, group_size, gen)
        packs.append(cpu.repack_for_cpu(qweight, qzeros, scales, bits, group_size))
    return rotating(lambda i: (lambda: cpu.cpu_forward_packed(x, packs[i], path=path)), copies), \
        ours_bytes(k, n, bits, group_size)


def make_dense(k: int, n: int, dtype: torch.dtype, copies: int, x: torch.Tensor):
    """F.linear(x.to(dtype), W) with W dtype [N, K]."""
    ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    xd = x.to(dtype)
    return rotating(lambda i: (lambda: F.linear(xd, ws[i])), copies)


def make_int8_dynamic(k: int, n: int, copies: int, x: torch.Tensor):
    """torch.ao.quantization.quantize_dynamic(nn.Linear(K, N), qint8) on x as float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
        from torch.ao.quantization import quantize_dynamic
        mods = [quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)), {torch.nn.Linear},
                                 dtype=torch.qint8) for _ in range(copies)]
    xf = x.float()
    return rotating(lambda i: (lambda: mods[i](xf)), copies)


def make_aten_int4(k: int, n: int, group_size: int, copies: int, x: torch.Tensor, dtype: torch.dtype):
    """torch.ops.aten._weight_int4pack_mm_for_cpu with activations in `dtype`."""
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    packs = []
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)           # uint8 [N, K/2]
        sz = torch.stack([torch.rand(k // group_size, n) * 0.01, torch.zeros(k // group_size, n)], -1)
        packs.append((packed, sz.to(dtype).contiguous()))                          # [G, N, 2] (scale, zero)
    xd = x.to(dtype)
    return rotating(lambda i: (lambda: op(xd, packs[i][0], group_size, packs[i][1])), copies)


# ---- output ---------------------------------------------------------------------------------

def publish(result: dict, table: str, json_path: str | None, md_path: str | None) -> None:
    """Print the markdown table, then write the result dict as JSON and the table as markdown
    (each atomically, parent folders created) where a path is given."""
    from pathlib import Path

    from fade_kernels.atomic import atomic_write_json, atomic_write_text

    print()
    print(table, flush=True)
    for path, write in ((json_path, lambda p: atomic_write_json(p, result)),
                        (md_path, lambda p: atomic_write_text(p, table + "\n"))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(Path(path))
