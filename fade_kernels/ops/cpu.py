"""CPU backend: fused 3/4-bit dequant-GEMV for decode, tile dequant + dense GEMM for encoders.

Importing this module registers the backend "cpu" (priority 10) with the registry. When the
native extension `fade_kernels._C` is missing or fails to load, the backend is registered as
unavailable with the reason, and nothing raises at import.

Two paths, chosen by the row count M of the flattened activation and its dtype:
  M <= fused_max_m(dtype)  fused kernel (csrc/cpu/qgemv_simd.inc): reads each packed word once,
      accumulates Σ x̃*q per group in fp32 over group-centred activations x̃ = x - μ and applies
      the group's scale and zero term once: y += s * (Σ x̃*q + μ * D), with D = Σ (q - z)
      precomputed at repack. AVX-512 / AVX2 / portable, picked at run time.
  larger M  dequantize W^T in column chunks to fp32 (bf16 for bf16 activations) and multiply
      with torch's dense GEMM (MKL / oneDNN).
The fused kernel runs near the FMA peak once M >= 8 (~200 GFLOP/s per Zen 5 core, AVX-512), so
for fp32 it stays ahead of the dense GEMM wherever MKL runs AVX2 kernels, i.e. on non-Intel CPUs:
on the Zen 5 test machine it is ~2x faster than fp32 F.linear at M = 1500. The thresholds are set
at import (override with the environment variables FADE_CPU_FUSED_MAX_M, FADE_CPU_FUSED_MAX_M_BF16):
  float32/float16  unlimited on non-Intel CPUs; 64 on Intel, where MKL's AVX-512 sgemm should be
                   at peak (a conservative guess, not measured: no Intel machine was available)
  bfloat16         48 when the CPU has AVX512_BF16/AMX (oneDNN's bf16 GEMM is then ~4x faster
                   than any fp32-FMA kernel at large M; measured crossover 48-64), else as float32

Both consume a load-time repack of the GPTQ tensors (`repack_for_cpu`), the "tiled" layout:
  words  int32   [T, K*bits/32, 32]  qweight's words, column tile t = columns 32t..32t+31,
                                     so one tile's whole K extent is one contiguous stream
  scales float16 [T, Gk, 32]         scales, same tiling, per kernel group
  zeros  uint8   [T, Gk, 32]         unpacked zero points (true zeros z, "v2"), per kernel group
  dsum   int16   [T, Gk, 32]         D = Σ_{k in group} (q_k - z) per kernel group
with T = ceil(N / 32); padded columns hold code 0, scale 0, zero 0, D 0. Kernel groups are the
checkpoint's groups split into pieces of at most KERNEL_GROUP_MAX inputs (only full-row groups
are larger; their scale and zero are repeated per piece), which bounds |D| for int16 and the
length of fp32 partial sums. `unpack_from_cpu` inverts the repack bit-exactly.

`cpu_forward` (the registry entry, reference_forward's signature) caches the repack per
(qweight, qzeros, scales, g_idx) tensor identity and version, so repeated calls on a layer pay
for it once; a caller that owns the layer can instead keep the result of `repack_for_cpu` and
call `cpu_forward_packed`.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

from fade_kernels.ops.registry import Backend, register_backend
from fade_kernels.packing import check_trivial_g_idx, pack_qzeros, padded_width, unpack_codes, unpack_qzeros

logger = logging.getLogger(__name__)

TILE_N = 32
"""Output columns per tile of the CPU layout (must match kTileN in csrc/cpu/qmatmul_cpu.h)."""

CPU_BITS = (3, 4)

KERNEL_GROUP_MAX = 128
"""Largest kernel group (inputs sharing one scale/D entry in the CPU layout); see the module docstring.
Full-row groups of K = 5120 measured 3x torch's fp32 error with 512-input pieces, 1-1.6x with 128."""

try:
    from fade_kernels import _C  # noqa: N814 (the conventional name of a torch extension)
    _IMPORT_ERROR = ""
except ModuleNotFoundError as exc:  # not built (pure-Python install or FADE_NO_EXT=1)
    _C = None
    _IMPORT_ERROR = f"fade_kernels._C is not built ({exc}); reinstall with a C++ compiler: " \
                    "pip install --no-build-isolation -e ."
    logger.info("CPU backend unavailable: %s", _IMPORT_ERROR)
except ImportError as exc:  # built but not loadable, e.g. compiled against another torch
    _C = None
    _IMPORT_ERROR = f"fade_kernels._C failed to load ({exc}); rebuild it against the installed torch: " \
                    "pip install --no-build-isolation -e ."
    logger.warning("CPU backend unavailable: %s", _IMPORT_ERROR)

if _C is not None and int(_C.TILE_N) != TILE_N:  # a stale build with another layout
    _IMPORT_ERROR = f"fade_kernels._C uses tiles of {_C.TILE_N} columns, this module expects {TILE_N}; rebuild it"
    logger.warning("CPU backend unavailable: %s", _IMPORT_ERROR)
    _C = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:  # importing must not fail over a tuning knob
        logger.warning("ignoring %s=%r: not an integer; using %d", name, value, default)
        return default


# Largest row count served by the fused kernel for float32/float16 and for bfloat16 activations
# (see the module docstring for how the defaults are chosen).
_UNLIMITED = 2 ** 62
if _C is not None:
    FUSED_MAX_M = _env_int("FADE_CPU_FUSED_MAX_M", 64 if _C.cpu_vendor() == "intel" else _UNLIMITED)
    FUSED_MAX_M_BF16 = _env_int("FADE_CPU_FUSED_MAX_M_BF16", 48 if _C.cpu_has_bf16_dot() else FUSED_MAX_M)
else:
    FUSED_MAX_M = FUSED_MAX_M_BF16 = 0


def fused_max_m(dtype: torch.dtype) -> int:
    """The largest M that path="auto" sends to the fused kernel for activations of `dtype`."""
    return FUSED_MAX_M_BF16 if dtype == torch.bfloat16 else FUSED_MAX_M


def cpu_available() -> tuple[bool, str]:
    """(True, "") when the native CPU kernels are loaded, else (False, why)."""
    return (_C is not None, _IMPORT_ERROR)


def cpu_isa() -> str:
    """The kernel family in use: "avx512", "avx2" or "scalar" (FADE_CPU_ISA overrides at load)."""
    _require_ext()
    return _C.active_isa()


def _require_ext() -> None:
    if _C is None:
        raise RuntimeError(f"the CPU backend is unavailable: {_IMPORT_ERROR}")


# ---- layout ---------------------------------------------------------------------------------

def _shape_args(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                group_size: int | None) -> tuple[int, int, int, int]:
    """Validate the GPTQ tensors; returns (K, N, G, group_size)."""
    if bits not in CPU_BITS:
        raise ValueError(f"bits must be one of {CPU_BITS} for the CPU backend, got {bits!r}")
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32),
                           ("scales", scales, torch.float16)):
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    kw, n = qweight.shape
    if (kw * 32) % bits or (kw * 32 // bits) % 32:
        raise ValueError(f"qweight has {kw} rows; {bits}-bit needs K*{bits}/32 rows with K a multiple of 32")
    k = kw * 32 // bits
    g = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape [G, N={n}], got {tuple(scales.shape)}")
    if g == 0 or k % g:
        raise ValueError(f"scales has {g} groups, which does not divide K={k}")
    if group_size is None or group_size == -1:
        group_size = k // g
    if group_size * g != k:
        raise ValueError(f"group_size={group_size} is inconsistent with K={k} and {g} groups in scales")
    if group_size % 32:
        raise ValueError(f"group_size must be a multiple of 32 for the CPU backend, got {group_size}")
    want = (g, padded_width(n) * bits // 32)
    if tuple(qzeros.shape) != want:
        raise ValueError(f"qzeros must have shape {list(want)} = [G, pad32(N)*bits/32], got {list(qzeros.shape)}")
    return k, n, g, group_size


def _tile(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, N] -> [T, R, TILE_N] (columns padded with 0), the CPU tiling."""
    r, n = t.shape
    pad = (-n) % TILE_N
    t = torch.nn.functional.pad(t.to(dtype), (0, pad)) if pad else t.to(dtype)
    return t.reshape(r, -1, TILE_N).permute(1, 0, 2).contiguous()


def _untile(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of _tile: [T, R, TILE_N] -> [R, n]."""
    tiles, r, _ = t.shape
    return t.permute(1, 0, 2).reshape(r, tiles * TILE_N)[:, :n].contiguous()


def kernel_group_size(group_size: int) -> int:
    """The largest multiple of 32 that divides group_size and is at most KERNEL_GROUP_MAX."""
    for size in range(min(group_size, KERNEL_GROUP_MAX) // 32 * 32, 0, -32):
        if group_size % size == 0:
            return size
    raise ValueError(f"group_size must be a multiple of 32, got {group_size}")


def repack_for_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int | None = None) -> dict:
    """GPTQ tensors -> the CPU tiled layout (an opaque dict for cpu_forward_packed).

    qweight int32 [K*bits/32, N]; qzeros int32 [G, pad32(N)*bits/32] holding true zeros ("v2");
    scales float16 [G, N]; group_size None or -1 means K / G.
    Returns {"words": int32 [T, K*bits/32, 32], "scales": float16 [T, Gk, 32],
    "zeros": uint8 [T, Gk, 32], "dsum": int16 [T, Gk, 32], "bits", "group_size" (the checkpoint's),
    "kernel_group" (K / Gk), "in_features", "out_features"}.
    Words are copied as they are (the bit layout inside each word is unchanged).
    """
    k, n, g, group_size = _shape_args(qweight, qzeros, scales, bits, group_size)
    kg = kernel_group_size(group_size)
    split = group_size // kg                                           # kernel groups per checkpoint group
    zeros_gn = unpack_qzeros(qzeros, bits, n).t()                      # [G, N] int32 in [0, 2^bits)
    zeros_kn = zeros_gn.repeat_interleave(split, dim=0)                # [Gk, N]
    codes_kn = unpack_codes(qweight, bits, dim=0)                      # [K, N] int32
    dsum = codes_kn.reshape(k // kg, kg, n).sum(dim=1) - kg * zeros_kn  # [Gk, N], |D| <= 128 * 15
    return {
        "words": _tile(qweight, torch.int32),                           # [T, K*bits/32, 32]
        "scales": _tile(scales.repeat_interleave(split, dim=0), torch.float16),  # [T, Gk, 32]
        "zeros": _tile(zeros_kn, torch.uint8),                          # [T, Gk, 32]
        "dsum": _tile(dsum, torch.int16),                               # [T, Gk, 32]
        "bits": bits, "group_size": group_size, "kernel_group": kg, "in_features": k, "out_features": n,
    }


def unpack_from_cpu(packed: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of repack_for_cpu: (qweight int32 [K*b/32, N], qzeros int32 [G, pad32(N)*b/32], scales fp16 [G, N])."""
    n, bits = packed["out_features"], packed["bits"]
    split = packed["group_size"] // packed["kernel_group"]
    qweight = _untile(packed["words"], n)
    scales = _untile(packed["scales"], n)[::split].contiguous()
    zeros_ng = _untile(packed["zeros"], n)[::split].to(torch.int32).t()
    return qweight, pack_qzeros(zeros_ng, bits), scales


# ---- forward --------------------------------------------------------------------------------

class _QMatmulFn(torch.autograd.Function):
    """Gradient with respect to x only (the packed weight is frozen): dx = dy @ W_hat."""

    @staticmethod
    def forward(ctx, x2, packed, bias, path):  # noqa: D401
        ctx.packed = packed
        return _run(x2, packed, bias, path)

    @staticmethod
    def backward(ctx, grad_y):
        p = ctx.packed
        w_t = _C.dequantize_t(p["words"], p["scales"], p["zeros"], p["bits"], p["kernel_group"],
                              p["out_features"])                               # [K, N] fp32
        grad_x = grad_y.float() @ w_t.t()                                      # [M, K]
        return grad_x.to(grad_y.dtype), None, None, None


def _run(x2: torch.Tensor, packed: dict, bias: torch.Tensor | None, path: str) -> torch.Tensor:
    return _C.qmatmul(x2, packed["words"], packed["scales"], packed["zeros"], packed["dsum"], bias, packed["bits"],
                      packed["kernel_group"], packed["out_features"], path, fused_max_m(x2.dtype))


def cpu_forward_packed(x: torch.Tensor, packed: dict, bias: torch.Tensor | None = None,
                       path: str = "auto") -> torch.Tensor:
    """y = x @ W_hat^T + bias from a repack_for_cpu result.

    x float32/bfloat16/float16 (..., K) on CPU; bias float (N,) or None. Returns (..., N) in x's
    dtype. path: "auto" (fused when M <= fused_max_m(x.dtype)), "fused" or "dequant".
    """
    if _C is None:
        _require_ext()
    k = packed["in_features"]
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got {x.shape[-1]}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)                              # [M, K]
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if x2.requires_grad and torch.is_grad_enabled():
        y2 = _QMatmulFn.apply(x2, packed, bias, path)
    else:
        y2 = _run(x2, packed, bias, path)                                      # [M, N]
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], packed["out_features"])


class _CacheEntry:
    __slots__ = ("refs", "versions", "packed")

    def __init__(self, tensors, versions, packed):
        self.refs = tuple(weakref.ref(t) for t in tensors)
        self.versions = versions
        self.packed = packed


_CACHE: dict[tuple[int, ...], _CacheEntry] = {}


def _version(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference mode)
        return -1


def _cached_repack(qweight, qzeros, scales, g_idx, bits) -> dict:
    # This runs on every decode step: keep the hit path to a few attribute reads.
    key = (id(qweight), id(qzeros), id(scales), id(g_idx))
    versions = (_version(qweight), _version(qzeros), _version(scales), _version(g_idx))
    entry = _CACHE.get(key)
    if entry is not None and entry.versions == versions:
        rw, rz, rs, rg = entry.refs
        if rw() is qweight and rz() is qzeros and rs() is scales and (rg is None or rg() is g_idx):
            return entry.packed
    packed = repack_for_cpu(qweight, qzeros, scales, bits)
    check_trivial_g_idx(g_idx, packed["in_features"], packed["group_size"], "the CPU")
    refs = (qweight, qzeros, scales) + ((g_idx,) if g_idx is not None else ())
    entry = _CacheEntry(refs, versions, packed)
    if g_idx is None:
        entry.refs = entry.refs + (None,)
    _CACHE[key] = entry
    # Drop the entry with the weight so that a recycled id() never reaches a stale repack.
    weakref.finalize(qweight, _CACHE.pop, key, None)
    return packed


def clear_cache() -> None:
    """Forget every cached repack (they are rebuilt on the next call)."""
    _CACHE.clear()


def cpu_forward(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int, out_features: int) -> torch.Tensor:
    """reference_forward's contract on the CPU kernels: x (..., K) float -> (..., N) in x's dtype.

    qweight int32 [K*bits/32, N]; qzeros int32 [G, pad32(N)*bits/32] (true zeros, "v2");
    scales float16 [G, N]; g_idx int32 [K] == arange(K) // (K/G) or None; bias float (N,) or None.
    The repack is cached per tensor identity and version (see the module docstring).
    """
    _require_ext()
    if qweight.dim() == 2 and qweight.shape[1] != out_features:
        raise ValueError(f"qweight has {qweight.shape[1]} columns but out_features={out_features}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor for the CPU backend, got device {x.device}")
    packed = _cached_repack(qweight, qzeros, scales, g_idx, bits)
    return cpu_forward_packed(x, packed, bias)


def _supports(m: int, bits: int, group_size: int, device: str) -> bool:
    return device == "cpu" and bits in CPU_BITS and (group_size == -1 or group_size % 32 == 0)


register_backend(Backend(name="cpu", fn=cpu_forward, devices=("cpu",), bits=CPU_BITS, priority=10,
                         available=_C is not None, why_unavailable=_IMPORT_ERROR, supports=_supports))
