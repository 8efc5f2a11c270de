"""GPTQ (arXiv 2210.17323) as a pure function on tensors, following docs/methods.md §3.

Minimise ||W X - W_hat X||^2 one column at a time with H = X X^T / T:
  1. dead inputs (diag H == 0): zero the weight column, set diag H to 1;
  2. optional act-order: visit columns by decreasing diag H, with static groups (every group's
     grid computed before the sweep, on the original column grouping, so inference needs no
     g_idx gather);
  3. U = upper Cholesky factor of H^-1 (with damping lambda = damp * mean diag H), by one
     Cholesky of the index-reversed H and one triangular inverse (solver/factor.py);
  4. sweep blocks of B columns; inside a block quantize column i, scale its error by U[i, i]
     and push it onto the block's remaining columns; after the block, one GEMM pushes the
     block's errors onto every later column (the lazy batch update).

The in-block loop has two implementations with bit-identical results: `_sweep_block_torch`,
the reference (a Python loop of torch calls per column, easy to read), and the fused C++
kernel csrc/cpu/gptq_sweep.cpp (`sweep_block_cpp`, no per-column Python), which performs the
same float32 operations in the same order. The trailing GEMM is the same torch call for both.

Worked 2x2 example (one row, integer grid of step 1, no damping, H = [[2, 1], [1, 2]]):
H^-1 = [[2, -1], [-1, 2]] / 3, so U = [[0.816, -0.408], [0, 0.707]]. For w = [0.4, 0.4],
column 0 rounds to 0: err = 0.4 / 0.816 = 0.49, and column 1 becomes 0.4 - 0.49 * (-0.408) =
0.6, which rounds to 1. GPTQ gives [0, 1] with output error dH dT = 0.56, where RTN's [0, 0]
gives 0.96: column 1 moved to compensate for its correlated neighbour.

Layers that read the same input share H; rows are independent given U, so stacking their
weights into one (sum N, K) matrix and sweeping once is exactly the per-layer result.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.numerics import check_finite, check_float16_scales, warn_if_all_zero_hessian
from fade_kernels.solver.factor import FACTOR_METHODS, damped_hessian, inverse_cholesky_upper
from fade_kernels.solver.grid import (CLIP_METHODS, StaticGrids, check_static_grids, compute_grid, dequantize_codes,
                                      quantize_to_codes, static_group_grids)
from fade_kernels.timing import stage

__all__ = ["GPTQResult", "GPTQFactor", "SweepResult", "StaticGrids", "gptq_quantize", "gptq_quantize_shared",
           "gptq_sweep", "prepare_gptq_factor", "cpp_sweep_available", "damped_hessian", "inverse_cholesky_upper",
           "SWEEP_IMPLS"]

SWEEP_IMPLS = ("auto", "torch", "cpp", "triton")

try:  # the fused sweep is optional: without the extension the torch loop runs
    from fade_kernels import _C  # noqa: N814 (the conventional name of a torch extension)
    _CPP_SWEEP_ERROR = "" if hasattr(_C, "gptq_sweep_block") else \
        "fade_kernels._C predates the fused GPTQ sweep; rebuild it: pip install --no-build-isolation -e ."
except ImportError as exc:
    _C = None
    _CPP_SWEEP_ERROR = f"fade_kernels._C is not available ({exc}); build it: pip install --no-build-isolation -e ."


def cpp_sweep_available() -> tuple[bool, str]:
    """(True, "") when the fused C++ sweep can run, else (False, why)."""
    return (not _CPP_SWEEP_ERROR, _CPP_SWEEP_ERROR)


class GPTQResult(NamedTuple):
    """codes int32 (N, K); scales float32 (N, G); zeros int32 (N, G); all in original column
    order, with W_hat[:, j] = (codes[:, j] - zeros[:, j // g]) * scales[:, j // g].
    perm int64 (K,) visiting order (None without act-order). loss: float, sum over columns of
    the squared error scaled by U's diagonal (GPTQ's objective, before the 1/2)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    loss: float


class SweepResult(NamedTuple):
    """codes int32 (N, K) in sweep order; scales float32 (N, G); zeros float32 (N, G),
    integer-valued; loss float32 (N,): each row's sum over columns of err^2."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: torch.Tensor


def _sweep_block_torch(W: torch.Tensor, U: torch.Tensor, i1: int, i2: int, out: SweepResult, g: int, bits: int,
                       sym: bool, column_group: list[int] | None, clip: str = "minmax",
                       hessian_diag: torch.Tensor | None = None) -> torch.Tensor:
    """The reference in-block loop over sweep columns [i1, i2) (docs/methods.md §3, step 4).

    W float32 (N, K) in sweep order, read only here; U float32 (K, K). Writes out.codes[:, i1:i2],
    out.loss, and (without column_group) the grid of every group entered in the block.
    column_group: the group of each sweep column for static grids, or None. clip, hessian_diag:
    how each entered group's grid is chosen (grid.compute_grid; hessian_diag float32 (K,) in
    sweep order). Returns the block's error Err1 float32 (N, i2 - i1) for the lazy update.
    """
    W1 = W[:, i1:i2].clone()
    U1 = U[i1:i2, i1:i2]
    Err1 = torch.zeros_like(W1)
    for i in range(i2 - i1):
        col = i1 + i
        if column_group is not None:
            grp = column_group[col]
        else:
            grp = col // g
            if col % g == 0:
                # Grid of the group entered here, on the weights as updated so far: in-block
                # columns from W1, columns past the block (a group wider than the rest of the
                # block) from W, which has only the lazy updates.
                group = torch.cat([W1[:, i:i + g], W[:, i2:col + g]], 1)
                weight = None if hessian_diag is None else hessian_diag[col:col + g]
                out.scales[:, grp:grp + 1], out.zeros[:, grp:grp + 1] = compute_grid(group, bits, sym, clip, weight)
        s, z = out.scales[:, grp], out.zeros[:, grp]
        w = W1[:, i]
        q = quantize_to_codes(w, s, z, bits)
        err = (w - dequantize_codes(q, s, z)) / U1[i, i]
        out.codes[:, col] = q.to(torch.int32)
        out.loss.add_(err * err)
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


def sweep_block_cpp(W: torch.Tensor, U: torch.Tensor, i1: int, i2: int, out: SweepResult, g: int, bits: int,
                     sym: bool, column_group: torch.Tensor | None, isa: str = "auto") -> torch.Tensor:
    """The same block as `_sweep_block_torch`, in one call of the fused C++ kernel.

    column_group: int32 (K,) contiguous, or None. isa: "auto", "avx512", "avx2" or "generic".
    """
    Err1 = torch.empty(W.shape[0], i2 - i1)  # contiguous (N, B), like the reference's Err1
    _C.gptq_sweep_block(W, U, i1, i2, bits, sym, g, column_group, out.scales, out.zeros, out.codes, Err1, out.loss, isa)
    return Err1


def gptq_sweep(W: torch.Tensor, U: torch.Tensor, bits: int, group_size: int, sym: bool = False,
               block_size: int = 128, static_grids: StaticGrids | None = None, impl: str = "torch",
               isa: str = "auto", clip: str = "minmax", hessian_diag: torch.Tensor | None = None) -> SweepResult:
    """Step 4 of GPTQ: the block sweep of W against U, with grids computed on the way.

    W: float32 (N, K), columns in sweep order (act-order permuted, dead columns zeroed);
      OVERWRITTEN with the lazily updated weights (pass a copy to keep it).
    U: float32 (K, K), upper Cholesky factor of the damped H^-1 in the same order.
    bits, group_size (32/64/128/-1), sym: the grid (grid.compute_grid).
    static_grids: None for grids computed when the sweep enters each group, on the updated
      weights; or precomputed grids for act-order with static groups.
    impl: "torch" (the reference loop), "cpp" (the fused kernel) or "triton" (one fused launch per
      block, solver/triton_sweep.py; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); all
      three give identical results. "triton" leaves W unmodified.
    isa: for impl="cpp" only: "auto", "avx512", "avx2" or "generic".
    clip: how a group's grid is chosen when the sweep enters it: "minmax", or a clipping search
      "mse" / "hessian" (grid.compute_grid), which only the torch loop implements (the fused
      kernels compute min-max grids in-kernel). hessian_diag: float32 (K,), diag H in sweep
      order, for clip="hessian".
    Returns a SweepResult (codes in sweep order).
    """
    validate_grid_args(bits, group_size)
    if impl not in ("torch", "cpp", "triton"):
        raise ValueError(f"impl must be 'torch', 'cpp' or 'triton', got {impl!r}")
    if clip != "minmax" and impl != "torch" and static_grids is None:
        raise ValueError(f"clip={clip!r} is computed by the torch sweep only; use impl='torch' (got {impl!r})")
    if impl == "triton":
        from fade_kernels.solver.triton_sweep import triton_gptq_sweep

        loss = torch.zeros(W.shape[0], device=W.device)
        result = triton_gptq_sweep(W, U, bits, group_size, sym, block_size, static_grids, loss_out=loss)
        return SweepResult(result.codes, result.scales, result.zeros.float(), loss)
    if impl == "cpp" and _CPP_SWEEP_ERROR:
        raise RuntimeError(f"impl='cpp' needs the fused C++ sweep: {_CPP_SWEEP_ERROR}")
    if W.dim() != 2 or W.dtype != torch.float32:
        raise ValueError(f"W must be float32 (N, K), got {W.dtype} of shape {tuple(W.shape)}")
    n_rows, n_cols = W.shape
    if U.shape != (n_cols, n_cols) or U.dtype != torch.float32:
        raise ValueError(f"U must be float32 ({n_cols}, {n_cols}) to match W's K, got {U.dtype} {tuple(U.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = resolve_group_size(group_size, n_cols)
    n_groups = n_cols // g
    # Both implementations must see the same operands with the same strides: a GEMM on another
    # layout may round differently, and then the weights of later blocks would differ.
    U = U.contiguous()
    if static_grids is not None:
        check_static_grids(static_grids, n_rows, n_cols, n_groups)
        scales, zeros, column_group = static_grids
        scales, zeros = scales.float().contiguous(), zeros.float().contiguous()
        groups = column_group.to(torch.int32).contiguous() if impl == "cpp" else column_group.tolist()
    else:
        scales, zeros, groups = torch.zeros(n_rows, n_groups), torch.zeros(n_rows, n_groups), None
    out = SweepResult(torch.zeros(n_rows, n_cols, dtype=torch.int32), scales, zeros, torch.zeros(n_rows))

    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        if impl == "cpp":
            Err1 = sweep_block_cpp(W, U, i1, i2, out, g, bits, sym, groups, isa)
        else:
            Err1 = _sweep_block_torch(W, U, i1, i2, out, g, bits, sym, groups, clip, hessian_diag)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return out


class GPTQFactor(NamedTuple):
    """What GPTQ derives from a Hessian alone (steps 1-3), reusable by every weight that reads the
    same input: FADE's two solves of one group, and the cross-attention k/v of every decoder block
    (they all read the encoder output).

    dead bool (K,): inputs with diag H == 0 (their weight columns are zeroed). perm int64 (K,):
    the act-order visiting order, or None. upper float32 (K, K): U with U^T U = (H' + lambda I)^-1,
    H' the dead-fixed H in visiting order. damp, act_order, method: the arguments it was built with.
    diag float32 (K,): diag H' in the original column order (the Hessian-weighted clipping search)."""

    dead: torch.Tensor
    perm: torch.Tensor | None
    upper: torch.Tensor
    damp: float
    act_order: bool
    method: str
    diag: torch.Tensor | None = None


def prepare_gptq_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False,
                        factor: str = "reversed") -> GPTQFactor:
    """Steps 1-3 of GPTQ for a Hessian float (K, K): dead inputs, act-order permutation, and U.

    gptq_quantize(..., prepared=this) then skips them; the codes are the same as without it."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (K, K), got shape {tuple(hessian.shape)}")
    if factor not in FACTOR_METHODS:
        raise ValueError(f"factor must be one of {FACTOR_METHODS}, got {factor!r}")
    if not (isinstance(damp, (int, float)) and 0.0 <= damp < float("inf")):
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of mean diag H), got {damp!r}")
    check_finite(hessian, "hessian")
    H = hessian.detach().clone().float()
    dead = torch.diagonal(H) == 0
    warn_if_all_zero_hessian(dead)
    H[dead, dead] = 1.0
    perm = None
    diag = torch.diagonal(H).clone()
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        H = H[perm][:, perm]
    with stage("factorisation"):
        upper = inverse_cholesky_upper(H, damp, method=factor)
    return GPTQFactor(dead, perm, upper, damp, act_order, factor, diag)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, bits: int = 4, group_size: int = 128,
                  sym: bool = False, act_order: bool = False, block_size: int = 128,
                  damp: float = 0.01, sweep: str = "auto", factor: str = "reversed",
                  prepared: GPTQFactor | None = None, clip: str = "minmax") -> GPTQResult:
    """Quantize one weight matrix (or several stacked ones sharing an input) with GPTQ.

    weight: float (N, K), the layer's weight (rows of stacked layers concatenated).
    hessian: float (K, K), X X^T / T over the calibration tokens of the layer input (may be None
      when `prepared` is given).
    sweep: "auto" (the fused C++ kernel for CPU tensors when it is built, the Triton kernel for
      CUDA tensors, else the torch loop), "torch" (the reference loop), "cpp" or "triton"; all
      give identical codes.
    factor: how U is computed, "reversed" (default, ~2n^3/3 flops) or "three_step" (the usual
      Cholesky / cholesky_inverse / Cholesky, ~5n^3/3); equal up to float rounding.
    prepared: prepare_gptq_factor(hessian, damp, act_order, factor) computed once for several
      weights; it must have been built with this call's damp, act_order and factor.
    clip: "minmax" (default), "mse" or "hessian": how each group's grid is chosen (grid.compute_grid).
      A clipping search runs in the torch loop ("auto" picks it; "cpp"/"triton" are refused),
      except with act_order, whose static grids are precomputed and fed to any sweep.
    Returns a GPTQResult; see its docstring for shapes.
    """
    validate_grid_args(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n_rows, n_cols = weight.shape
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: GPTQ needs at least one row and one column")
    check_finite(weight, "weight")
    if prepared is None:
        if hessian is None:
            raise ValueError("gptq_quantize needs a hessian (K, K) or a prepared factor")
        if hessian.shape != (n_cols, n_cols):
            raise ValueError(f"hessian must have shape ({n_cols}, {n_cols}) to match weight's K, "
                             f"got {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if sweep not in SWEEP_IMPLS:
        raise ValueError(f"sweep must be one of {SWEEP_IMPLS}, got {sweep!r}")
    if factor not in FACTOR_METHODS:
        raise ValueError(f"factor must be one of {FACTOR_METHODS}, got {factor!r}")
    if prepared is None:
        prepared = prepare_gptq_factor(hessian, damp, act_order, factor)
    elif prepared.upper.shape != (n_cols, n_cols):
        raise ValueError(f"prepared factor is for K = {prepared.upper.shape[0]}, but weight has K = {n_cols}")
    elif (prepared.damp, prepared.act_order, prepared.method) != (damp, act_order, factor):
        raise ValueError(f"prepared factor was built with damp={prepared.damp}, act_order={prepared.act_order}, "
                         f"factor={prepared.method!r}; this call asks for damp={damp}, act_order={act_order}, "
                         f"factor={factor!r}")
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    in_kernel_grids = clip == "minmax" or act_order
    if sweep in ("cpp", "triton") and not in_kernel_grids:
        raise ValueError(f"clip={clip!r} needs sweep='torch' or 'auto' (the fused sweeps compute min-max grids)")
    if sweep == "auto" and not in_kernel_grids:
        sweep = "torch"
    if sweep == "auto":
        if weight.device.type == "cuda":
            sweep = "triton"
        else:
            sweep = "cpp" if not _CPP_SWEEP_ERROR and weight.device.type == "cpu" else "torch"
    resolve_group_size(group_size, n_cols)   # raises unless the group size divides K

    W = weight.detach().clone().float()
    W[:, prepared.dead] = 0.0

    perm, grids = prepared.perm, None
    diag = prepared.diag
    if clip == "hessian" and diag is None:
        raise ValueError("clip='hessian' needs a factor built by prepare_gptq_factor (it carries diag H)")
    if act_order:
        # Static groups: every grid comes from the original grouping before any update.
        grids = static_group_grids(W, perm, bits, group_size, sym, clip, diag)
        W = W[:, perm]
    sweep_diag = None
    if clip == "hessian" and not act_order:
        sweep_diag = diag.float().contiguous()

    with stage("sweep"):
        swept = gptq_sweep(W, prepared.upper, bits, group_size, sym, block_size, grids, impl=sweep,
                           clip="minmax" if act_order else clip, hessian_diag=sweep_diag)
    check_float16_scales(swept.scales)   # the fused kernels compute their grids themselves
    codes = swept.codes
    if perm is not None:
        codes = torch.empty_like(swept.codes)
        codes[:, perm] = swept.codes
    return GPTQResult(codes, swept.scales, swept.zeros.to(torch.int32), perm, float(swept.loss.sum()))


def gptq_quantize_shared(weights: list[torch.Tensor], hessian: torch.Tensor, **kwargs) -> list[GPTQResult]:
    """Layers that read one input (q/k/v): one stacked sweep, split back per layer.

    weights: list of float (N_i, K) sharing the Hessian (K, K). Returns one GPTQResult per
    weight (perm shared; loss is the stacked total, reported on the first result only).
    """
    sizes = [w.shape[0] for w in weights]
    stacked = gptq_quantize(torch.cat([w.float() for w in weights], 0), hessian, **kwargs)
    parts = zip(stacked.codes.split(sizes), stacked.scales.split(sizes), stacked.zeros.split(sizes))
    return [GPTQResult(c, s, z, stacked.perm, stacked.loss if i == 0 else 0.0) for i, (c, s, z) in enumerate(parts)]
