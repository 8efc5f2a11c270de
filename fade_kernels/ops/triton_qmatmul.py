"""Triton backend: dequant-matmul kernels that read the GPTQ packed layout as it is stored.

Importing this module registers the backend "triton" (priority 20, CUDA tensors). It is marked
unavailable, with the reason, when triton does not import or torch sees no CUDA device; nothing
raises at import. With TRITON_INTERPRET=1 (set before this module is imported) the kernels run
on CPU tensors in Triton's interpreter, which is how the tests drive them; the registry entry
still only claims "cuda" tensors.

Inputs (no repack: both kernels consume the checkpoint layout of fade_kernels/packing.py):
  x        float16/bfloat16/float32 [..., K]
  qweight  int32 [K*b/32, N]  column n's codes as one little-endian bit stream along K: code k at
           stream bits [k*b, k*b + b); 32 codes fill exactly b words (3-bit codes 10 and 21 of
           every run straddle two words, see packing.py)
  qzeros   int32 [G, pad32(N)*b/32]  true zero points ("v2"), packed the same way along N
  scales   float16 [G, N]
  g_idx    int32 [K] or None; must equal arange(K) // (K/G) (static groups): the kernels derive
           the group from k and never gather
  bias     float [N] or None
Output: [..., N] in x's dtype.

Two kernels, chosen by the row count M of the flattened activation:
  M <= GEMV_MAX_M  `_qgemv_kernel`: split-K GEMV. The packed words are read once each: a program
      walks runs of 32 codes (b words) with every shift and word boundary resolved at compile
      time (tl.static_range over the 32 codes of a run), accumulates x * (q - z) in fp32 for
      BLOCK_R runs (which lie in one group) and applies the group's scale once per step. Split-K
      spreads a decode GEMV (few output tiles) over the whole GPU; the SPLIT_K partial sums are
      added by torch (deterministic, unlike atomics).
  larger M  `_qgemm_kernel`: tiled GEMM. Each K-step dequantizes a [BLOCK_K, BLOCK_N] tile of
      W^T to x's dtype (the same rounding as the reference, which casts W_hat to x's dtype) and
      multiplies it on the tensor cores with tl.dot, fp32 accumulation. BLOCK_K divides the
      group size, so one step has one scale and zero per column.
fp32 activations use IEEE fp32 dot products unless torch.backends.cuda.matmul.allow_tf32 is set,
the same rule torch's own fp32 matmul follows.

On a GPU both kernels are autotuned (key: shapes, bits, M bucket); under the interpreter a
single fixed, small config is used because autotuning would run every config in Python.

Status: correct under the interpreter (tests/ops/test_triton_qmatmul.py) and compiled for sm_90
without a GPU (triton_compile_check.py: `.target sm_90a`, wgmma in the fp16/bf16 GEMM, no
register spills in the GEMV configs the launcher can pick). Never run on a real GPU: the config
lists are plausible defaults, not measured choices, and there are no speed numbers yet.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

from fade_kernels.ops.reference import input_gradient
from fade_kernels.ops.registry import Backend, gpu_backend_status, register_backend
from fade_kernels.packing import check_trivial_g_idx, padded_width

logger = logging.getLogger(__name__)

TRITON_BITS = (2, 3, 4, 8)
"""Widths the kernels read (any width whose 32-code run fills whole words)."""

GEMV_MAX_M = 16
"""Largest M served by the GEMV kernel under path="auto"; larger M goes to the tl.dot GEMM."""

_GEMV_MAX_BLOCK_M = 8    # GEMV rows per program: more would mostly add registers, not reuse
_GEMV_MAX_BLOCK_R = 4    # runs of 32 inputs per GEMV step (128 inputs) at BLOCK_M = 1; see qgemv
_GEMM_MAX_BLOCK_K = 64

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001 - optional backend: a broken triton install must not break the package
    triton = tl = None
    _IMPORT_ERROR = f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"


def _interpret_mode() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 parses the variable here
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = _interpret_mode()
"""True when TRITON_INTERPRET was set before import: kernels run on CPU tensors, one fixed config."""


def triton_available() -> tuple[bool, str]:
    """(True, "") when the backend can run on this machine's GPU, else (False, why)."""
    return gpu_backend_status(_IMPORT_ERROR if triton is None else None)


# ---- kernels --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _unpack_zeros(row_ptr, offs_n, mask_n, BITS: tl.constexpr):
        """Zero points of columns offs_n from one qzeros row (a bit stream along N), as uint32."""
        bit = offs_n * BITS
        shift = (bit % 32).to(tl.uint32)
        # uint32 so that >> is a logical shift: the sign bit is an ordinary bit of the stream.
        lo = tl.load(row_ptr + bit // 32, mask=mask_n, other=0).to(tl.uint32, bitcast=True)
        z = lo >> shift
        if 32 % BITS != 0:
            # A zero that straddles two words takes its high bits from bit 0 of the next word.
            spill = mask_n & ((bit % 32) + BITS > 32)
            hi = tl.load(row_ptr + bit // 32 + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
            z = z | (hi << ((32 - shift) % 32))   # hi is 0 where nothing spills
        return z & ((1 << BITS) - 1)

    @triton.jit
    def _code_minus_zero(code, z_magic):
        """(q - z) as fp32 from uint32 codes q < 2^23 and z_magic = 2^23 + z (fp32).

        OR-ing q into the exponent pattern of 2^23 gives the float 2^23 + q exactly, so one
        subtraction yields q - z exactly: an OR instead of an int->float conversion, which runs
        at a fraction of the FMA rate and would otherwise bound the decode GEMV.
        """
        return (code | 0x4B000000).to(tl.float32, bitcast=True) - z_magic

    @triton.jit
    def _qgemv_kernel(
        x_ptr,            # activations [M, K] (fp16/bf16/fp32), row stride stride_xm, unit column stride
        qweight_ptr,      # int32 [K*BITS/32, N], contiguous
        qzeros_ptr,       # int32 [G, pad32(N)*BITS/32], row stride stride_zg
        scales_ptr,       # [G, N] contiguous (fp16 in checkpoints; any float type loads)
        bias_ptr,         # [N] float, read only when HAS_BIAS
        out_ptr,          # [SPLIT_K, M, N] contiguous: y itself (x's dtype) when SPLIT_K == 1, else fp32 partials
        M, N, K,          # problem size; K is a multiple of 32
        stride_xm,        # elements between rows of x
        stride_zg,        # elements between rows of qzeros
        stride_ok,        # elements between the SPLIT_K slices of out (M * N)
        group_size,       # inputs per group (K when the layer has one group); a multiple of 32 * BLOCK_R unless G == 1
        steps_per_split,  # K-steps (BLOCK_R runs each) per program along grid axis 1
        BITS: tl.constexpr,     # code width: 2, 3, 4 or 8
        BLOCK_M: tl.constexpr,  # rows of x per program (power of two)
        BLOCK_R: tl.constexpr,  # runs of 32 inputs per K-step (power of two)
        BLOCK_N: tl.constexpr,  # output columns per program
        HAS_BIAS: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        mask_n = offs_n < N
        mask_m = offs_m < M
        n_runs = K // 32
        step_lo = pid_k * steps_per_split
        step_hi = tl.minimum(step_lo + steps_per_split, tl.cdiv(n_runs, BLOCK_R))
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(step_lo, step_hi):
            runs = step * BLOCK_R + offs_r                                            # [BLOCK_R]
            mask_r = runs < n_runs
            g = (step * BLOCK_R * 32) // group_size                                   # one group per step
            z = _unpack_zeros(qzeros_ptr + g * stride_zg, offs_n, mask_n, BITS).to(tl.float32) + 8388608.0  # 2^23 + z
            s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)     # [BLOCK_N]
            # Word j of run r sits in qweight row r*BITS + j.
            w_ptrs = qweight_ptr + (runs * BITS)[:, None] * N + offs_n[None, :]      # [BLOCK_R, BLOCK_N]
            mask_w = mask_r[:, None] & mask_n[None, :]
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (runs * 32)[None, :]       # [BLOCK_M, BLOCK_R]
            mask_x = mask_m[:, None] & mask_r[None, :]
            acc3 = tl.zeros([BLOCK_M, BLOCK_R, BLOCK_N], dtype=tl.float32)
            word = tl.load(w_ptrs, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
            # Code i of a run starts at stream bit i*BITS: word i*BITS // 32, shift i*BITS % 32, all
            # compile-time constants here, so each word is loaded once and no shift is computed.
            for i in tl.static_range(32):
                SHIFT = (i * BITS) % 32   # constexpr: i and BITS are
                WORD = (i * BITS) // 32
                if SHIFT + BITS <= 32:
                    code = (word >> SHIFT) & ((1 << BITS) - 1)
                    if SHIFT + BITS == 32 and i < 31:  # the next code starts a fresh word
                        word = tl.load(w_ptrs + (WORD + 1) * N, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
                else:
                    # Straddling code (3-bit codes 10 and 21): low 32-SHIFT bits at the top of this
                    # word, the rest at the bottom of the next one.
                    nxt = tl.load(w_ptrs + (WORD + 1) * N, mask=mask_w, other=0).to(tl.uint32, bitcast=True)
                    code = ((word >> SHIFT) | (nxt << (32 - SHIFT))) & ((1 << BITS) - 1)
                    word = nxt
                xi = tl.load(x_ptrs + i, mask=mask_x, other=0.0).to(tl.float32)      # [BLOCK_M, BLOCK_R]
                # (q - z) is a small exact integer in fp32: no cancellation against a z * sum(x) term.
                acc3 += xi[:, :, None] * _code_minus_zero(code, z[None, :])[None, :, :]
            acc += tl.sum(acc3, axis=1) * s[None, :]                                  # scale once per step
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + pid_k * stride_ok + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _qgemm_kernel(
        x_ptr,            # activations [M, K] (fp16/bf16/fp32), row stride stride_xm, unit column stride
        qweight_ptr,      # int32 [K*BITS/32, N], contiguous
        qzeros_ptr,       # int32 [G, pad32(N)*BITS/32], row stride stride_zg
        scales_ptr,       # [G, N] contiguous
        bias_ptr,         # [N] float, read only when HAS_BIAS
        out_ptr,          # y [M, N] contiguous, x's dtype
        M, N, K,          # problem size; K is a multiple of 32
        stride_xm,        # elements between rows of x
        stride_zg,        # elements between rows of qzeros
        group_size,       # inputs per group (K when the layer has one group); a multiple of BLOCK_K unless G == 1
        m_bucket,         # next power of two of M: only an autotune key, so that each M does not retune
        BITS: tl.constexpr,     # code width: 2, 3, 4 or 8
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # a power-of-two multiple of 32 dividing group_size
        GROUP_M: tl.constexpr,  # row tiles visited together, so that they share W tiles in L2
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 x: "ieee" or "tf32"
        UPCAST_DOT: tl.constexpr,     # interpreter only: multiply bf16 operands as fp32 (see qgemm)
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k                                                          # [BLOCK_K]
            mask_k = kk < K
            bit = kk * BITS                                                           # stream bit of code kk
            shift = (bit % 32).to(tl.uint32)[:, None]
            mask_w = mask_k[:, None] & mask_n[None, :]
            w_ptrs = qweight_ptr + (bit // 32)[:, None] * N + offs_n[None, :]         # [BLOCK_K, BLOCK_N]
            code = tl.load(w_ptrs, mask=mask_w, other=0).to(tl.uint32, bitcast=True) >> shift
            if 32 % BITS != 0:
                spill = mask_w & (((bit % 32) + BITS) > 32)[:, None]
                hi = tl.load(w_ptrs + N, mask=spill, other=0).to(tl.uint32, bitcast=True)
                code = code | (hi << ((32 - shift) % 32))                             # hi is 0 where nothing spills
            code = code & ((1 << BITS) - 1)
            g = k0 // group_size
            z = _unpack_zeros(qzeros_ptr + g * stride_zg, offs_n, mask_n, BITS).to(tl.float32) + 8388608.0  # 2^23 + z
            s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            # Round W_hat to x's dtype, as the reference does, then multiply on the tensor cores.
            w = (_code_minus_zero(code, z[None, :]) * s[None, :]).to(x_ptr.dtype.element_ty)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)           # [BLOCK_M, BLOCK_K]
            if UPCAST_DOT:  # exact: a bf16 product is exact in fp32
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    if INTERPRET:
        # One small config: the interpreter executes programs one by one in Python.
        _GEMV_FIXED = dict(BLOCK_N=64)
        _GEMM_FIXED = dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=4)
        _qgemv_launch = _qgemv_kernel
        _qgemm_launch = _qgemm_kernel
    else:
        _GEMV_FIXED = _GEMM_FIXED = {}
        _qgemv_launch = triton.autotune(
            configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                     for bn, w, st in ((64, 2, 2), (128, 4, 2), (128, 4, 3), (256, 4, 2), (256, 8, 3), (512, 8, 2))],
            key=["N", "K", "BITS", "BLOCK_M", "BLOCK_R", "steps_per_split"],
        )(_qgemv_kernel)
        _qgemm_launch = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
                     for bm, bn, w, st in ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                                           (128, 256, 8, 3), (32, 64, 4, 4), (64, 256, 8, 3))],
            key=["m_bucket", "N", "K", "BITS", "BLOCK_K"],
        )(_qgemm_kernel)


# ---- validation -------------------------------------------------------------------------------

def _check_args(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, bits: int, out_features: int) -> tuple[int, int, int]:
    """Validate the call; returns (K, N, group_size)."""
    if bits not in TRITON_BITS:
        raise ValueError(f"bits must be one of {TRITON_BITS} for the Triton backend, got {bits!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor, got {t.dtype} with shape {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise ValueError(f"scales must be a 2-D float tensor [G, N], got {scales.dtype} with shape {tuple(scales.shape)}")
    kw, n = qweight.shape
    if n != out_features:
        raise ValueError(f"qweight has {n} columns but out_features={out_features}")
    if kw % bits:
        raise ValueError(f"qweight has {kw} rows; {bits}-bit needs K*{bits}/32 rows with K a multiple of 32")
    k = kw * 32 // bits
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k} (from qweight's {kw} rows), got {x.shape[-1]}")
    g = scales.shape[0]
    if scales.shape[1] != n or g == 0 or k % g:
        raise ValueError(f"scales must have shape [G, N={n}] with G dividing K={k}, got {tuple(scales.shape)}")
    group_size = k // g
    if group_size % 32:
        raise ValueError(f"group_size must be a multiple of 32 for the Triton kernels, got {group_size} (K={k}, G={g})")
    want = (g, padded_width(n) * bits // 32)
    if tuple(qzeros.shape) != want:
        raise ValueError(f"qzeros must have shape {list(want)} = [G, pad32(N)*bits/32], got {list(qzeros.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [N={n}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, qweight, qzeros, scales) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"x, qweight, qzeros, scales and bias must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), got {device}")
    return k, n, group_size


_G_IDX_OK: dict[int, tuple] = {}


def check_static_g_idx(g_idx: torch.Tensor | None, in_features: int, group_size: int) -> None:
    """Raise unless g_idx is None or arange(K) // group_size (the only order the kernels read).

    The check (a device sync on GPU) runs once per g_idx tensor and version, not once per call.
    """
    if g_idx is None:
        return
    key = id(g_idx)
    version = getattr(g_idx, "_version", -1) if not g_idx.is_inference() else -1
    seen = _G_IDX_OK.get(key)
    if seen is not None and seen[0]() is g_idx and seen[1:] == (version, in_features, group_size):
        return
    check_trivial_g_idx(g_idx, in_features, group_size, "the Triton")
    _G_IDX_OK[key] = (weakref.ref(g_idx), version, in_features, group_size)
    weakref.finalize(g_idx, _G_IDX_OK.pop, key, None)


def _pow2_block(multiple_of_32: int, cap: int) -> int:
    """Largest power-of-two multiple of 32, at most cap, that divides multiple_of_32."""
    block = 32
    while block * 2 <= cap and multiple_of_32 % (block * 2) == 0:
        block *= 2
    return block


def _default_split_k(device: torch.device, tiles: int, steps: int) -> int:
    """Enough K-splits for about two programs per SM (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(steps, -(-2 * sms // max(tiles, 1))))


# ---- launchers --------------------------------------------------------------------------------

def qgemv(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
          bias: torch.Tensor | None, bits: int, group_size: int, split_k: int | None = None) -> torch.Tensor:
    """Split-K GEMV launch (no validation: call through triton_forward).

    x2 [M, K] float16/bfloat16/float32 with unit column stride; qweight int32 [K*bits/32, N];
    qzeros int32 [G, pad32(N)*bits/32]; scales [G, N]; bias [N] or None; group_size = K / G.
    split_k None picks one for the device. Returns y [M, N] in x2's dtype.
    """
    m, k = x2.shape
    n = qweight.shape[1]
    runs = k // 32
    g = k // group_size
    block_m = min(triton.next_power_of_2(m), _GEMV_MAX_BLOCK_M)
    # Every thread holds the step's 32 * BLOCK_M * BLOCK_R activations: BLOCK_M * BLOCK_R <= 4 kept
    # ptxas (sm_90) under 255 registers without spills in every config; 8 x 4 spilled 2.9 KB.
    # One group per K-step: BLOCK_R runs must also divide the group (with one group, the kernel
    # masks the runs past K instead).
    block_r_cap = max(1, _GEMV_MAX_BLOCK_R // block_m)
    block_r = block_r_cap if g == 1 else _pow2_block(group_size, 32 * block_r_cap) // 32
    steps = triton.cdiv(runs, block_r)
    m_blocks = triton.cdiv(m, block_m)
    if split_k is None:
        split_k = _default_split_k(x2.device, triton.cdiv(n, 128) * m_blocks, steps)
    split_k = max(1, min(int(split_k), steps))
    steps_per_split = triton.cdiv(steps, split_k)
    split_k = triton.cdiv(steps, steps_per_split)           # no empty splits
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x2.dtype, device=x2.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x2.device)
    has_bias = bias is not None and split_k == 1

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), split_k, m_blocks)

    _qgemv_launch[grid](
        x2, qweight, qzeros, scales, bias if has_bias else scales, out,
        m, n, k, x2.stride(0), qzeros.stride(0), m * n, k if g == 1 else group_size, steps_per_split,
        BITS=bits, BLOCK_M=block_m, BLOCK_R=block_r, HAS_BIAS=has_bias, **_GEMV_FIXED)
    if split_k == 1:
        return out[0]
    y = out.sum(dim=0)
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


def qgemm(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
          bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Tiled tl.dot GEMM launch (no validation: call through triton_forward).

    Same tensors as qgemv. Returns y [M, N] in x2's dtype.
    """
    m, k = x2.shape
    n = qweight.shape[1]
    g = k // group_size
    block_k = _GEMM_MAX_BLOCK_K if g == 1 else _pow2_block(group_size, _GEMM_MAX_BLOCK_K)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    precision = "tf32" if x2.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # Triton 3.9's interpreter stores bf16 as uint16 and its tl.dot multiplies those raw integers
    # (garbage results); upcasting the already-rounded operands keeps the kernel's arithmetic.
    upcast = INTERPRET and x2.dtype == torch.bfloat16

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _qgemm_launch[grid](
        x2, qweight, qzeros, scales, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), qzeros.stride(0), k if g == 1 else group_size, triton.next_power_of_2(m),
        BITS=bits, BLOCK_K=block_k, HAS_BIAS=bias is not None, DOT_PRECISION=precision, UPCAST_DOT=upcast,
        **_GEMM_FIXED)
    return out


class _TritonQMatmulFn(torch.autograd.Function):
    """Gradient with respect to x only (the packed weight is frozen): dx = dy @ W_hat."""

    @staticmethod
    def forward(ctx, x2, qweight, qzeros, scales, bias, bits, group_size, path, split_k):  # noqa: D401
        ctx.save_for_backward(qweight, qzeros, scales)
        ctx.bits, ctx.group_size = bits, group_size
        return _run(x2, qweight, qzeros, scales, bias, bits, group_size, path, split_k)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, qzeros, scales = ctx.saved_tensors
        grad_x = input_gradient(grad_y, qweight, qzeros, scales, None, ctx.bits, qweight.shape[1])
        return grad_x, None, None, None, None, None, None, None, None


def _run(x2, qweight, qzeros, scales, bias, bits, group_size, path, split_k):
    if path == "gemv" or (path == "auto" and x2.shape[0] <= GEMV_MAX_M):
        return qgemv(x2, qweight, qzeros, scales, bias, bits, group_size, split_k)
    return qgemm(x2, qweight, qzeros, scales, bias, bits, group_size)


def triton_forward(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int, out_features: int,
                   *, path: str = "auto", split_k: int | None = None) -> torch.Tensor:
    """reference_forward's contract on the Triton kernels: x (..., K) float -> (..., N) in x's dtype.

    x float16/bfloat16/float32 [..., K]; qweight int32 [K*bits/32, N]; qzeros int32
    [G, pad32(N)*bits/32] (true zeros, "v2"; symmetric grids simply store 2^(bits-1));
    scales float16 [G, N]; g_idx int32 [K] == arange(K) // (K/G), or None; bias float [N] or None.
    path: "auto" (GEMV when M <= GEMV_MAX_M, else GEMM), "gemv" or "gemm". split_k: GEMV K-splits
    (None: about two programs per SM). Tensors live on CUDA, or on CPU under TRITON_INTERPRET=1.
    """
    if triton is None:
        raise RuntimeError(f"the Triton backend is unavailable: {_IMPORT_ERROR}")
    if path not in ("auto", "gemv", "gemm"):
        raise ValueError(f"path must be 'auto', 'gemv' or 'gemm', got {path!r}")
    k, n, group_size = _check_args(x, qweight, qzeros, scales, bias, bits, out_features)
    check_static_g_idx(g_idx, k, group_size)
    x2 = x.reshape(-1, k)                                                    # [M, K]
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    if x2.requires_grad and torch.is_grad_enabled():
        y2 = _TritonQMatmulFn.apply(x2, qweight, qzeros, scales, bias, bits, group_size, path, split_k)
    else:
        y2 = _run(x2, qweight, qzeros, scales, bias, bits, group_size, path, split_k)   # [M, N]
    return y2.reshape(*x.shape[:-1], n)


def _supports(m: int, bits: int, group_size: int, device: str) -> bool:
    return device == "cuda" and bits in TRITON_BITS and (group_size == -1 or group_size % 32 == 0)


_AVAILABLE, _WHY = triton_available()
if not _AVAILABLE:
    logger.info("Triton backend unavailable: %s", _WHY)
register_backend(Backend(name="triton", fn=triton_forward, devices=("cuda",), bits=TRITON_BITS, priority=20,
                         available=_AVAILABLE, why_unavailable=_WHY, supports=_supports))
