"""CPU backend: fused 3/4-bit dequant-GEMV for decode, tile dequant + dense GEMM for encoders.

Importing this module registers the backend "cpu" (priority 10) with the registry. When the
native extension `fade_kernels._C` is missing or fails to load, the backend is registered as
unavailable with the reason, and nothing raises at import.

Paths, chosen by the row count M of the flattened activation and its dtype:
  M <= fused_max_m(dtype), or M <= INT8_MAX_M with int8 activations: a fused kernel that reads
  each packed word once:
    int8 activations (activations="int8"; "auto" picks it when the family runs it as SIMD and
      M <= INT8_MAX_M, so that a batch decodes with the arithmetic of one utterance): each
      kernel group of x is quantized once per call to int8 with its own scale, and the codes
      meet it in integer dot products (vpdpbusd; csrc/cpu/q8_simd.inc):
      y += s_w * s_x * (Σ xq*q - z * Σ xq), exact in the bracket. Extra error against the fp32
      dequantized reference: each |x - xq*s_x| <= s_x / 2, so per output
      |Δy_n| <= Σ_g s_x,g / 2 * Σ_{k in g} |W[n, k]|   (tests/ops/test_cpu_q8.py checks it).
      AVX-512 VNNI / AVX-VNNI / AVX2 without VNNI (vpmaddubsw + vpmaddwd: the same sums,
      q8_avx2.cpp) / portable, all bit-identical.
    fp32 activations (csrc/cpu/qgemv_simd.inc): accumulates Σ x̃*q per group in fp32 over
      group-centred activations x̃ = x - μ and applies the group's scale and zero term once:
      y += s * (Σ x̃*q + μ * D), with D = Σ (q - z) precomputed at repack. AVX-512 / AVX2 / portable.
  larger M  F.linear on the layer's dequantized weight kept in a cache (DENSE_CACHE_BYTES, in the
      GEMM's dtype), or past that budget: dequantize W^T in column chunks to fp32 (bf16 for bf16
      activations) and multiply with torch's dense GEMM (MKL / oneDNN).
With AVX-512 the fused kernel runs near the FMA peak once M >= 8 (~200 GFLOP/s per Zen 5 core),
so for fp32 it stays ahead of the dense GEMM wherever MKL runs AVX2 kernels, i.e. on non-Intel
CPUs: on the Zen 5 test machine it is ~2x faster than fp32 F.linear at M = 1500. The AVX2 fused
kernel has half the vector width and loses to MKL's AVX2 sgemm past M ~ 32. The thresholds are
set at import from the kernel family (override with the environment variables
FADE_CPU_FUSED_MAX_M, FADE_CPU_FUSED_MAX_M_BF16):
  float32/float16  AVX-512: unlimited on non-Intel CPUs; 64 on Intel, where MKL's AVX-512 sgemm
                   should be at peak (a conservative guess, not measured: no Intel machine was
                   available). AVX2 or portable: AVX2_FUSED_MAX_M = 32 (measured crossover 16-64)
  bfloat16         48 when the CPU has AVX512_BF16/AMX (oneDNN's bf16 GEMM is then ~4x faster
                   than any fp32-FMA kernel at large M; measured crossover 48-64); otherwise as
                   float32 on AVX-512, and unlimited on AVX2, where torch's bf16 GEMM is emulated

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

from fade_kernels.ops.registry import Backend, register_backend, tensor_version
from fade_kernels.packing import check_trivial_g_idx, pack_codes, pack_qzeros, padded_width, unpack_codes, unpack_qzeros

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


_UNLIMITED = 2 ** 62

AVX2_FUSED_MAX_M = 32
"""Default fused/dense crossover for float32 activations when the kernel family is not AVX-512.
On an AVX2-only CPU the fused kernel takes 0.4-0.84x F.linear's time at M = 16 and 1.0-1.4x at
M = 64-128 (3-bit worse than 4-bit), and MKL's AVX2 sgemm wins from there on
(benchmarks/results/kernels-cpu/large_m_tiny_base_amd_avx2.md)."""


def _default_fused_max_m(isa: str, vendor: str, bf16_dot: bool) -> tuple[int, int]:
    """(float32/float16, bfloat16) crossovers before the environment overrides, for the kernel
    family `isa` chosen at load, the CPU `vendor` and whether it has a bf16 dot product."""
    if isa == "avx512":
        fp32 = 64 if vendor == "intel" else _UNLIMITED
        return fp32, 48 if bf16_dot else fp32
    # AVX2 or portable kernels: the dense sgemm wins at large M. Without a bf16 dot product,
    # torch's bf16 GEMM is 4-9x slower than the fused kernel at every measured M (same table),
    # so bf16 activations stay on the fused kernel.
    return AVX2_FUSED_MAX_M, 48 if bf16_dot else _UNLIMITED


# Largest row count served by the fused kernel for float32/float16 and for bfloat16 activations,
# fixed at import from the family the CPU runs (set_isa, a test and benchmark knob, keeps them).
if _C is not None:
    _FP32_DEFAULT, _BF16_DEFAULT = _default_fused_max_m(_C.active_isa(), _C.cpu_vendor(), bool(_C.cpu_has_bf16_dot()))
    FUSED_MAX_M = _env_int("FADE_CPU_FUSED_MAX_M", _FP32_DEFAULT)
    FUSED_MAX_M_BF16 = _env_int("FADE_CPU_FUSED_MAX_M_BF16", _BF16_DEFAULT)
else:
    FUSED_MAX_M = FUSED_MAX_M_BF16 = 0


ACTIVATION_MODES = ("auto", "int8", "fp32")


def _env_mode() -> str:
    value = os.environ.get("FADE_CPU_ACTIVATIONS", "auto")
    if value not in ACTIVATION_MODES:
        logger.warning("ignoring FADE_CPU_ACTIVATIONS=%r: not one of %s; using 'auto'", value, ACTIVATION_MODES)
        return "auto"
    return value


ACTIVATIONS = _env_mode()
"""Default activation mode of the fused kernel (FADE_CPU_ACTIVATIONS): "auto", "int8" or "fp32"."""

INT8_MAX_M = _env_int("FADE_CPU_INT8_MAX_M", 64)
"""Largest M that activations="auto" sends to the int8 kernel (FADE_CPU_INT8_MAX_M); those calls
stay on the fused kernel up to this M even where fused_max_m(dtype) is lower.

A decoder calls its linears with batch x prompt-length rows on its first step and batch rows
after it. A limit below the first step's row count would give a batch fp32 activations on that
step where one utterance gets int8, and greedy transcripts would then depend on the batch size.
64 rows cover the first step of a batch of 16 with Whisper's 4-token multilingual prompt. On an
AVX2 CPU without VNNI the int8 kernel is faster than the fp32-activation kernel at every M from 1
to 128 and no slower than the dense GEMM up to M = 64 on tiny and base layer shapes
(benchmarks/results/kernels-cpu/activation_rows_amd_avx2.md)."""

DENSE_CACHE_BYTES = _env_int("FADE_CPU_DENSE_CACHE_MB", 1024) << 20
"""Budget of the large-M dense-weight cache (FADE_CPU_DENSE_CACHE_MB, default 1024; 0 disables it).

Calls on the dequant path (M > fused_max_m) keep each layer's dequantized weight, in the GEMM's
dtype (float32, or bfloat16 for bfloat16 activations), in the layer's packed dict until the
budget is spent, and then run exactly F.linear on it: the same GEMM as a dense model, without
re-dequantizing per call. Layers beyond the budget dequantize per call (dequant + GEMM)."""

_DENSE_CACHED = [0]  # bytes held by the dense-weight cache now

# Whether the active kernel family's int8 kernel runs as SIMD code here (refreshed by set_isa).
_Q8_NATIVE = [bool(_C is not None and _C.q8_native())]


def set_isa(name: str) -> None:
    """Force a kernel family ("avx512", "avx2" or "scalar"; tests and benchmarks drive every path)."""
    _require_ext()
    _C.set_isa(name)
    _Q8_NATIVE[0] = bool(_C.q8_native())


def int8_native() -> bool:
    """Whether activations="auto" may pick the int8 kernel: the active family runs it as SIMD code
    (AVX-512 VNNI, AVX-VNNI or AVX2), not the portable loop."""
    return _Q8_NATIVE[0]


def fused_max_m(dtype: torch.dtype) -> int:
    """The largest M that path="auto" sends to the fused kernel for activations of `dtype`."""
    return FUSED_MAX_M_BF16 if dtype == torch.bfloat16 else FUSED_MAX_M


def _int8_activations(m: int, activations: str | None) -> bool:
    mode = activations or ACTIVATIONS
    return mode == "int8" or (mode == "auto" and _Q8_NATIVE[0] and m <= INT8_MAX_M)


def _fused_limit(dtype: torch.dtype, int8: bool) -> int:
    return max(fused_max_m(dtype), INT8_MAX_M) if int8 else fused_max_m(dtype)


def auto_kernel(m: int, dtype: torch.dtype, activations: str | None = None) -> str:
    """What cpu_forward_packed(path="auto") runs for M rows of `dtype` activations: "int8" or
    "fp32" (the fused kernel with those activations) or "dense" (the GEMM on the dequantized
    weight). activations as in cpu_forward_packed (None: the module default ACTIVATIONS)."""
    int8 = _int8_activations(m, activations)
    if m > _fused_limit(dtype, int8):
        return "dense"
    return "int8" if int8 else "fp32"


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


def repack_q8_3bit(qweight: torch.Tensor) -> torch.Tensor:
    """3-bit qweight int32 [K*3/32, N] (GPTQ layout) -> the same words in the int8 kernel's layout.

    Per column and 32-code run (3 words, 12 bytes; csrc/cpu/qmatmul_cpu.h): byte j holds code j at
    bits 0-2 and code 12+j at bits 3-5; bits 6-7 of bytes 0-7 hold the low two bits of code 24+j;
    bits 6 and 7 of byte 8+i (i = 0..3) hold the high bit of codes 24+i and 28+i.
    """
    codes = unpack_codes(qweight, 3, dim=0).to(torch.int64)                 # [K, N]
    k, n = codes.shape
    runs = codes.reshape(k // 32, 32, n)
    a, b, c = runs[:, :12], runs[:, 12:24], runs[:, 24:]                   # [R, 12|12|8, N]
    byte = a | (b << 3)
    byte[:, :8] |= (c & 3) << 6
    byte[:, 8:] |= ((c[:, :4] >> 2) << 6) | ((c[:, 4:] >> 2) << 7)
    words = byte.reshape(k // 32, 3, 4, n)
    words = words[:, :, 0] | (words[:, :, 1] << 8) | (words[:, :, 2] << 16) | (words[:, :, 3] << 24)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.reshape(k // 32 * 3, n).to(torch.int32)


def unpack_q8_3bit(words: torch.Tensor) -> torch.Tensor:
    """Inverse of repack_q8_3bit: the q8-layout words int32 [K*3/32, N] -> GPTQ qweight int32 [K*3/32, N]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    kw, n = w.shape
    byte = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=1)   # [Kw, 4, N]
    byte = byte.reshape(kw // 3, 12, n)
    a, b = byte & 7, (byte >> 3) & 7
    c = (byte[:, :8] >> 6) | (torch.cat([(byte[:, 8:] >> 6) & 1, byte[:, 8:] >> 7], dim=1) << 2)
    codes = torch.cat([a, b, c], dim=1).reshape(kw // 3 * 32, n)
    return pack_codes(codes, 3, dim=0)


# ---- forward --------------------------------------------------------------------------------

class _QMatmulFn(torch.autograd.Function):
    """Gradient with respect to x only (the packed weight is frozen): dx = dy @ W_hat."""

    @staticmethod
    def forward(ctx, x2, packed, bias, path, activations):  # noqa: D401
        ctx.packed = packed
        return _run(x2, packed, bias, path, activations)

    @staticmethod
    def backward(ctx, grad_y):
        p = ctx.packed
        w_t = _C.dequantize_t(p["words"], p["scales"], p["zeros"], p["bits"], p["kernel_group"],
                              p["out_features"])                               # [K, N] fp32
        grad_x = grad_y.float() @ w_t.t()                                      # [M, K]
        return grad_x.to(grad_y.dtype), None, None, None, None


def _words_q8(packed: dict) -> torch.Tensor:
    """The int8 kernel's words: the tiled words themselves at 4-bit, the q8 layout at 3-bit (built on
    first use and kept in the dict: a second copy of the 3-bit words)."""
    words = packed.get("words_q8")
    if words is None:
        if packed["bits"] == 4:
            words = packed["words"]
        else:
            qweight = _untile(packed["words"], packed["out_features"])
            words = _tile(repack_q8_3bit(qweight), torch.int32)
        packed["words_q8"] = words
    return words


def _release_dense(nbytes: int) -> None:
    _DENSE_CACHED[0] -= nbytes


def _dense_weight(packed: dict, dtype: torch.dtype) -> torch.Tensor | None:
    """The cached dequantized weight (N, K) in `dtype`, built on first use within the budget, else None."""
    dense = packed.get("dense")
    if dense is not None and dense.dtype == dtype:
        return dense
    if dense is not None:  # cached in the other dtype: drop it (its finalizer returns its bytes)
        del packed["dense"], dense
    nbytes = packed["in_features"] * packed["out_features"] * (2 if dtype == torch.bfloat16 else 4)
    if _DENSE_CACHED[0] + nbytes > DENSE_CACHE_BYTES:
        return None
    w_t = _C.dequantize_t(packed["words"], packed["scales"], packed["zeros"], packed["bits"],
                          packed["kernel_group"], packed["out_features"])              # [K, N] fp32, exact
    dense = w_t.t().to(dtype).contiguous()                                             # [N, K]
    packed["dense"] = dense
    _DENSE_CACHED[0] += nbytes
    weakref.finalize(dense, _release_dense, nbytes)
    return dense


def _run(x2: torch.Tensor, packed: dict, bias: torch.Tensor | None, path: str,
         activations: str | None = None) -> torch.Tensor:
    m = x2.shape[0]
    int8 = _int8_activations(m, activations)
    max_m = _fused_limit(x2.dtype, int8)
    if path == "auto" and m > max_m and DENSE_CACHE_BYTES > 0:
        # Large M: the dense GEMM on the cached dequantized weight (see DENSE_CACHE_BYTES).
        gemm_dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
        dense = _dense_weight(packed, gemm_dtype)
        if dense is not None:
            y = torch.nn.functional.linear(x2.to(gemm_dtype), dense, None if bias is None else bias.to(gemm_dtype))
            return y.to(x2.dtype)
    return _C.qmatmul(x2, packed["words"], packed["scales"], packed["zeros"], packed["dsum"], bias, packed["bits"],
                      packed["kernel_group"], packed["out_features"], path, max_m, 0,
                      _words_q8(packed) if int8 else None)


def cpu_forward_packed(x: torch.Tensor, packed: dict, bias: torch.Tensor | None = None,
                       path: str = "auto", activations: str | None = None) -> torch.Tensor:
    """y = x @ W_hat^T + bias from a repack_for_cpu result.

    x float32/bfloat16/float16 (..., K) on CPU; bias float (N,) or None. Returns (..., N) in x's
    dtype. path: "auto" (fused when M <= fused_max_m(x.dtype), or M <= INT8_MAX_M for int8
    activations), "fused" or "dequant".
    activations (the fused path): "int8" (quantize each kernel group of x to int8, integer dot
    products), "fp32" (the fp32-activation kernel), "auto" (int8 when int8_native() and
    M <= INT8_MAX_M) or None (the module default ACTIVATIONS, from FADE_CPU_ACTIVATIONS).
    """
    if _C is None:
        _require_ext()
    if activations is not None and activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES} or None, got {activations!r}")
    k = packed["in_features"]
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got {x.shape[-1]}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)                              # [M, K]
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if x2.requires_grad and torch.is_grad_enabled():
        y2 = _QMatmulFn.apply(x2, packed, bias, path, activations)
    else:
        y2 = _run(x2, packed, bias, path, activations)                        # [M, N]
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], packed["out_features"])


class _CacheEntry:
    __slots__ = ("refs", "versions", "packed")

    def __init__(self, tensors, versions, packed):
        self.refs = tuple(weakref.ref(t) for t in tensors)
        self.versions = versions
        self.packed = packed


_CACHE: dict[tuple[int, ...], _CacheEntry] = {}


_version = tensor_version


def _cached_repack(qweight, qzeros, scales, g_idx, bits) -> dict:
    # This runs on every decode step: keep the hit path to a few attribute reads.
    key = (id(qweight), id(qzeros), id(scales), id(g_idx))
    entry = _CACHE.get(key)
    if entry is not None:
        rw, rz, rs, rg = entry.refs
        if rw() is qweight and rz() is qzeros and rs() is scales and (rg is None or rg() is g_idx) and \
                entry.versions == (_version(qweight), _version(qzeros), _version(scales), _version(g_idx)):
            return entry.packed
    versions = (_version(qweight), _version(qzeros), _version(scales), _version(g_idx))
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
    if _C is None:
        _require_ext()
    if not x.is_cpu:
        raise ValueError(f"x must be a CPU tensor for the CPU backend, got device {x.device}")
    packed = _cached_repack(qweight, qzeros, scales, g_idx, bits)
    if packed["out_features"] != out_features:
        raise ValueError(f"qweight has {packed['out_features']} columns but out_features={out_features}")
    if x.dim() == 2 and x.shape[1] == packed["in_features"] and x.is_contiguous() and not x.requires_grad and \
            (bias is None or bias.dtype == torch.float32):
        return _run(x, packed, bias, "auto")  # a decode step: nothing for cpu_forward_packed to adapt
    return cpu_forward_packed(x, packed, bias)


def cpu_bind(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
             bias: torch.Tensor | None, bits: int, out_features: int):
    """Backend.bind: y = f(x2) for x2 float [M, K] contiguous CPU, no gradient (the repack captured)."""
    _require_ext()
    packed = _cached_repack(qweight, qzeros, scales, g_idx, bits)
    if packed["out_features"] != out_features:
        raise ValueError(f"qweight has {packed['out_features']} columns but out_features={out_features}")
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return lambda x2: _run(x2, packed, bias, "auto")


def _supports(m: int, bits: int, group_size: int, device: str) -> bool:
    return device == "cpu" and bits in CPU_BITS and (group_size == -1 or group_size % 32 == 0)


register_backend(Backend(name="cpu", fn=cpu_forward, devices=("cpu",), bits=CPU_BITS, priority=10,
                         available=_C is not None, why_unavailable=_IMPORT_ERROR, supports=_supports, bind=cpu_bind))
