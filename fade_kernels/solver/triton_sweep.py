"""The GPTQ column sweep (docs/methods.md §3, step 4) as one Triton launch per block of columns.

`fade_kernels.solver.gptq` walks a block of B columns in a Python loop: per column, a grid
(when the sweep enters a group), a rounding, an error and a rank-1 update of the block's
remaining columns, i.e. ~6 small torch calls per column. Here one kernel launch does the whole
block: each program owns BLOCK_N rows, keeps their (BLOCK_N, B) slice of the block in
registers, and for column i of the block

    grid   (only when column i starts a group, or per column from precomputed static grids)
    q      = clamp(round(w_i / s) + z, 0, 2^b - 1)                  -> codes[:, i]
    err    = (w_i - (q - z) * s) / U[i, i]                           -> E[:, i]
    W[:, j] -= err * U[i, j]              for the block's columns j > i
    loss  += err * err

Rows are independent given U, so programs never talk to each other. The kernel writes the
block's error E (N, B); the lazy trailing update W[:, after] -= E @ U[block, after] then stays
one torch GEMM, written exactly as the torch loop writes it (same operands, same layouts, so it
rounds the same way and later blocks see identical weights).

Bit-exactness with the torch loop. The codes must equal `gptq_quantize`'s for the same W and U,
so every float operation is the one torch performs, in the same order, with the same rounding:
  * division is IEEE round-to-nearest (`tl.math.div_rn`); a plain `/` compiles to the
    approximate `div.full.f32` on NVIDIA GPUs;
  * no fused multiply-add: torch computes `err * U[i, j]` into a temporary, then subtracts, i.e.
    two roundings; the kernel is launched with `enable_fp_fusion=False`, so LLVM/ptxas keep
    `mul.rn` + `sub.rn` instead of contracting them into one `fma.rn` (one rounding);
  * `torch.round` rounds half to even; Triton has no rint outside libdevice (which the
    interpreter cannot run), so `_round_half_even` adds and subtracts 1.5 * 2^23: in
    [2^23, 2^24) float32 spacing is exactly 1, so the add itself rounds to the nearest integer,
    ties to even, and the subtraction is exact (valid for |x| <= 2^22; inputs are clamped there
    first, which cannot change a code clamped to [0, 2^b - 1] afterwards);
  * float16 scales round up exactly like `grid._round_up_to_float16`: round to nearest even in
    float16, and if that fell below the float32 value, step one float16 ulp up (bit pattern + 1);
  * min/max/abs and the column extraction (a masked sum with exact zeros) are exact in any order.
Signed zeros may differ (e.g. round(-0.3) is -0.0 in torch and +0.0 here); they cannot change a
code, a scale or a zero point.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.solver.grid import StaticGrids, check_static_grids, static_group_grids

# 1.5 * 2^23: adding it lands every |x| <= 2^22 in the binade [2^23, 2^24) where the float32
# spacing is 1, so the addition rounds x to an integer (ties to even); subtracting is exact.
_RNE_MAGIC = tl.constexpr(12582912.0)
_RNE_LIMIT = tl.constexpr(4194304.0)  # 2^22
# Smallest positive float16 subnormal, as in grid.py: a smaller scale would be 0 in a checkpoint.
_MIN_FP16_SCALE = tl.constexpr(2.0 ** -24)
_INF = tl.constexpr(float("inf"))


@triton.jit
def _round_half_even(x):
    """float32 -> float32 integer-valued, round half to even like torch.round."""
    x = tl.minimum(tl.maximum(x, -_RNE_LIMIT), _RNE_LIMIT)
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _round_up_to_float16(v):
    """Smallest float16-representable value >= v (v > 0), returned as float32."""
    h = v.to(tl.float16)  # round to nearest even
    hf = h.to(tl.float32)
    # Positive float16 values are ordered like their bit patterns: +1 is the next one up.
    step_up = (h.to(tl.int16, bitcast=True) + 1).to(tl.int16)
    up = step_up.to(tl.float16, bitcast=True).to(tl.float32)
    return tl.where(hf < v, up, hf)


@triton.jit
def _grid_from_range(wmin, wmax, amax, BITS: tl.constexpr, SYM: tl.constexpr):
    """Scale and zero per row from the group's min/max (asym) or max |w| (sym), as grid.compute_grid."""
    MAXQ: tl.constexpr = (1 << BITS) - 1
    if SYM:
        scale = tl.math.div_rn(amax, ((1 << (BITS - 1)) - 1) * 1.0)
        degenerate = amax == 0.0
    else:
        lo = tl.minimum(wmin, 0.0)
        hi = tl.maximum(wmax, 0.0)
        scale = tl.math.div_rn(hi - lo, MAXQ * 1.0)
        degenerate = hi == lo
    scale = tl.where(degenerate, 1.0, scale)
    scale = _round_up_to_float16(tl.maximum(scale, _MIN_FP16_SCALE))
    if SYM:
        zero = tl.full(scale.shape, (1 << (BITS - 1)) * 1.0, tl.float32)
    else:
        zero = _round_half_even(tl.math.div_rn(-lo, scale))
        zero = tl.minimum(tl.maximum(zero, 0.0), MAXQ * 1.0)
    return scale, zero


@triton.jit
def _gptq_block_sweep_kernel(
    w_ptr,        # float32 (N, K): working weight; block columns [i1, i2) read once, and columns
                  #   [i2, group end) read when a group straddles the block end (never written)
    u_ptr,        # float32 (K, K): upper Cholesky factor of H^-1, in sweep order
    codes_ptr,    # int32 (N, K): out, codes of columns [i1, i2), sweep order
    scales_ptr,   # float32 (N, G): out (dynamic grids, written on entering a group) or in (static)
    zeros_ptr,    # float32 (N, G): same as scales_ptr, integer-valued
    err_ptr,      # float32 (N, >= i2 - i1): out, the block's scaled errors E
    loss_ptr,     # float32 (N,): in/out, per-row running sum of err^2
    gidx_ptr,     # int32 (K,): group of each sweep column (static grids only; unused otherwise)
    n_rows,       # N
    i1,           # first column of the block
    i2,           # one past the block's last column (i2 - i1 <= BLOCK_B)
    group,        # group width g (K for one group per row)
    stride_w, stride_u, stride_c, stride_s, stride_e,  # row strides (elements); columns contiguous
    BITS: tl.constexpr,      # 2, 3, 4 or 8
    SYM: tl.constexpr,       # symmetric grid (zero fixed at 2^(BITS-1))
    STATIC: tl.constexpr,    # grids precomputed (act-order with static groups)
    BLOCK_N: tl.constexpr,   # rows per program
    BLOCK_B: tl.constexpr,   # power of two >= i2 - i1
    BLOCK_C: tl.constexpr,   # column tile for the part of a group past the block
):
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    width = i2 - i1
    col_ok = cols < width
    rows64 = rows.to(tl.int64)  # N * K can exceed 2^31 for stacked large layers

    wb = tl.load(w_ptr + rows64[:, None] * stride_w + (i1 + cols)[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    loss = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)
    if STATIC:
        scale = tl.full((BLOCK_N,), 1.0, tl.float32)
        zero = tl.zeros((BLOCK_N,), tl.float32)
    else:
        # A block may start inside a group (g > B, or g = -1): continue with the grid an
        # earlier launch wrote. If the block starts a group, column 0 recomputes it.
        scale = tl.load(scales_ptr + rows64 * stride_s + i1 // group, mask=row_ok, other=1.0)
        zero = tl.load(zeros_ptr + rows64 * stride_s + i1 // group, mask=row_ok, other=0.0)

    for i in range(0, width):
        col = i1 + i
        if STATIC:
            grp = tl.load(gidx_ptr + col)
            scale = tl.load(scales_ptr + rows64 * stride_s + grp, mask=row_ok, other=1.0)
            zero = tl.load(zeros_ptr + rows64 * stride_s + grp, mask=row_ok, other=0.0)
        else:
            if col % group == 0:
                # Entering a group: its grid from the weights as updated so far, i.e. the block's
                # columns from registers (all in-block updates applied) and, if the group runs
                # past the block, later columns from memory (lazy updates of earlier blocks only).
                in_group = (cols >= i) & (cols < i + group) & col_ok
                wmin = tl.min(tl.where(in_group[None, :], wb, _INF), axis=1)
                wmax = tl.max(tl.where(in_group[None, :], wb, -_INF), axis=1)
                amax = tl.max(tl.where(in_group[None, :], tl.abs(wb), 0.0), axis=1)
                for c0 in range(i2, col + group, BLOCK_C):
                    ccols = c0 + tl.arange(0, BLOCK_C)
                    cmask = row_ok[:, None] & (ccols < col + group)[None, :]
                    tile = tl.load(w_ptr + rows64[:, None] * stride_w + ccols[None, :], mask=cmask, other=0.0)
                    wmin = tl.minimum(wmin, tl.min(tl.where(cmask, tile, _INF), axis=1))
                    wmax = tl.maximum(wmax, tl.max(tl.where(cmask, tile, -_INF), axis=1))
                    amax = tl.maximum(amax, tl.max(tl.abs(tile), axis=1))
                scale, zero = _grid_from_range(wmin, wmax, amax, BITS, SYM)
                grp = col // group
                tl.store(scales_ptr + rows64 * stride_s + grp, scale, mask=row_ok)
                tl.store(zeros_ptr + rows64 * stride_s + grp, zero, mask=row_ok)

        # Column i out of the register tile: a sum of one value and exact zeros.
        w = tl.sum(tl.where((cols == i)[None, :], wb, 0.0), axis=1)
        q = _round_half_even(tl.math.div_rn(w, scale)) + zero
        q = tl.minimum(tl.maximum(q, 0.0), MAXQ * 1.0)
        # (q - z) * s, then w - that, then / U[i, i]: torch's operations in torch's order.
        dequant = (q - zero) * scale
        diag = tl.load(u_ptr + col.to(tl.int64) * stride_u + col)
        err = tl.math.div_rn(w - dequant, diag)
        loss = loss + err * err
        tl.store(codes_ptr + rows64 * stride_c + col, q.to(tl.int32), mask=row_ok)
        tl.store(err_ptr + rows64 * stride_e + i, err, mask=row_ok)

        # Rank-1 update of the columns after i with U's row i (product rounded, then subtracted).
        later = (cols > i) & col_ok
        u_row = tl.load(u_ptr + col.to(tl.int64) * stride_u + i1 + cols, mask=later, other=0.0)
        wb = tl.where(later[None, :], wb - err[:, None] * u_row[None, :], wb)

    tl.store(loss_ptr + rows, loss, mask=row_ok)


class TritonSweepResult(NamedTuple):
    """codes int32 (N, K) in the weight's (sweep) column order; scales float32 (N, G);
    zeros int32 (N, G), groups in original column order (= sweep order without act-order)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


# The static-group grids of gptq_quantize(act_order=True), under the name this module's callers use.
static_grids_for = static_group_grids


def _check_runnable(weight: torch.Tensor) -> None:
    if weight.is_cuda:
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    raise RuntimeError(
        f"triton_gptq_sweep needs CUDA tensors (got weight on {weight.device}); CPU tensors run only "
        f"under the Triton interpreter, with TRITON_INTERPRET=1 set before triton is imported")


def triton_gptq_sweep(weight: torch.Tensor, u_factor: torch.Tensor, bits: int, group_size: int,
                      sym: bool = False, block_size: int = 128, static_grids: StaticGrids | None = None,
                      *, loss_out: torch.Tensor | None = None, block_rows: int | None = None,
                      num_warps: int = 4) -> TritonSweepResult:
    """GPTQ sweep of `weight` against `u_factor`: one fused launch per block, one GEMM after it.

    weight: float (N, K), columns in sweep order (already act-order permuted, dead columns
      zeroed; a QEP/FADE-corrected weight is just another weight). Not modified.
    u_factor: float32 (K, K), upper Cholesky factor of the damped H^-1 in the same order.
    bits, group_size (32/64/128/-1), sym: the grid (grid.compute_grid).
    block_size: B, columns per launch (the lazy-update block).
    static_grids: None for grids computed when the sweep enters each group (on the updated
      weights); or a gptq.StaticGrids (scales float32 (N, G), zeros (N, G) integer-valued,
      column_group int (K,) in sweep order; see `static_grids_for`) for act-order with static groups.
    loss_out: optional float32 (N,), accumulated in place with each row's sum of err^2 in
      column order (the torch loop's `loss` vector).
    block_rows: rows per program (power of two); default 16 on GPU, up to 64 in the interpreter.
    Returns TritonSweepResult(codes int32 (N, K) sweep order, scales float32 (N, G), zeros int32 (N, G)),
    equal bit for bit to the torch loop of `gptq_quantize` on the same W and U.
    """
    validate_grid_args(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n_rows, n_cols = weight.shape
    if tuple(u_factor.shape) != (n_cols, n_cols):
        raise ValueError(f"u_factor must have shape ({n_cols}, {n_cols}) to match weight's K, "
                         f"got {tuple(u_factor.shape)}")
    if u_factor.device != weight.device:
        raise ValueError(f"u_factor must be on weight's device {weight.device}, got {u_factor.device}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = resolve_group_size(group_size, n_cols)
    n_groups = n_cols // g
    _check_runnable(weight)
    if block_rows is None:
        block_rows = 16 if weight.is_cuda else min(64, triton.next_power_of_2(max(n_rows, 1)))
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")

    device = weight.device
    W = weight.detach().to(torch.float32).clone()  # contiguous working copy
    U = u_factor.detach().to(torch.float32).contiguous()
    codes = torch.empty(n_rows, n_cols, dtype=torch.int32, device=device)
    if static_grids is not None:
        check_static_grids(static_grids, n_rows, n_cols, n_groups)
        scales, zeros, column_group = static_grids
        scales = scales.to(device=device, dtype=torch.float32).contiguous()
        zeros = zeros.to(device=device, dtype=torch.float32).contiguous()
        gidx = column_group.to(device=device, dtype=torch.int32).contiguous()
    else:
        scales = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=device)
        zeros = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=device)
        gidx = torch.zeros(1, dtype=torch.int32, device=device)  # unused
    if loss_out is None:
        loss = torch.zeros(n_rows, dtype=torch.float32, device=device)
    else:
        if tuple(loss_out.shape) != (n_rows,) or loss_out.dtype != torch.float32 or loss_out.device != device:
            raise ValueError(f"loss_out must be float32 ({n_rows},) on {device}, got {loss_out.dtype} "
                             f"{tuple(loss_out.shape)} on {loss_out.device}")
        loss = loss_out if loss_out.is_contiguous() else loss_out.contiguous()

    block_b = triton.next_power_of_2(min(block_size, max(n_cols, 1)))
    err = torch.empty(n_rows, min(block_size, n_cols), dtype=torch.float32, device=device)
    launch_grid = (triton.cdiv(n_rows, block_rows),)
    if n_rows:
        for i1 in range(0, n_cols, block_size):
            i2 = min(i1 + block_size, n_cols)
            _gptq_block_sweep_kernel[launch_grid](
                W, U, codes, scales, zeros, err, loss, gidx,
                n_rows, i1, i2, g,
                W.stride(0), U.stride(0), codes.stride(0), scales.stride(0), err.stride(0),
                BITS=bits, SYM=sym, STATIC=static_grids is not None,
                BLOCK_N=block_rows, BLOCK_B=block_b, BLOCK_C=64,
                num_warps=num_warps, enable_fp_fusion=False)
            if i2 < n_cols:
                # The lazy batch update, the same expression as the torch loop (same GEMM, same
                # operands), so the weights later blocks see are identical too.
                E = err[:, :i2 - i1]
                W[:, i2:] -= E @ U[i1:i2, i2:]
    if loss_out is not None and loss is not loss_out:
        loss_out.copy_(loss)
    return TritonSweepResult(codes, scales, zeros.to(torch.int32))
