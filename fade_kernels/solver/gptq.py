"""GPTQ (arXiv 2210.17323) as a pure function on tensors, following background §4.

Minimise ||W X - W_hat X||^2 one column at a time with H = X X^T / T:
  1. dead inputs (diag H == 0): zero the weight column, set diag H to 1;
  2. optional act-order: visit columns by decreasing diag H, with static groups (every group's
     grid computed before the sweep, on the original column grouping, so inference needs no
     g_idx gather);
  3. U = upper Cholesky factor of H^-1 (with damping lambda = damp * mean diag H);
  4. sweep blocks of B columns; inside a block quantize column i, scale its error by U[i, i]
     and push it onto the block's remaining columns; after the block, one GEMM pushes the
     block's errors onto every later column (the lazy batch update).

Worked 2x2 example (one row, integer grid of step 1, no damping, H = [[2, 1], [1, 2]]):
H^-1 = [[2, -1], [-1, 2]] / 3, so U = [[0.816, -0.408], [0, 0.707]]. For w = [0.4, 0.4],
column 0 rounds to 0: err = 0.4 / 0.816 = 0.49, and column 1 becomes 0.4 - 0.49 * (-0.408) =
0.6, which rounds to 1. GPTQ gives [0, 1] with output error dH dT = 0.56, where RTN's [0, 0]
gives 0.96: column 1 moved to compensate for its correlated neighbour.

Layers that read the same input share H; rows are independent given U, so stacking their
weights into one (sum N, K) matrix and sweeping once is exactly the per-layer result.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.solver.grid import compute_grid, dequantize_codes, quantize_to_codes

log = logging.getLogger(__name__)


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


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, float32 (K, K)."""
    lam = damp * torch.diagonal(hessian).mean()
    out = hessian.clone()
    out.diagonal().add_(lam)
    return out


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper-triangular U with U^T U = (H + lambda I)^-1, float32 (K, K).

    If H is not positive definite after damping (e.g. too few calibration tokens), the damping
    is raised tenfold up to three times before giving up, and a warning says so.
    """
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(damped_hessian(hessian, damp))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        log.warning("Hessian not positive definite with damp=%g; retrying with damp=%g", damp, damp * 10)
        damp *= 10
    raise RuntimeError("Hessian is not positive definite even with heavy damping; "
                       "is the calibration data empty or constant?")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = False, act_order: bool = False, block_size: int = 128,
                  damp: float = 0.01) -> GPTQResult:
    """Quantize one weight matrix (or several stacked ones sharing an input) with GPTQ.

    weight: float (N, K), the layer's weight (rows of stacked layers concatenated).
    hessian: float (K, K), X X^T / T over the calibration tokens of the layer input.
    Returns a GPTQResult; see its docstring for shapes.
    """
    validate_grid_args(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n_rows, n_cols = weight.shape
    if hessian.shape != (n_cols, n_cols):
        raise ValueError(f"hessian must have shape ({n_cols}, {n_cols}) to match weight's K, got {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = resolve_group_size(group_size, n_cols)
    n_groups = n_cols // g

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(n_rows, n_groups)
    zeros = torch.zeros(n_rows, n_groups)
    perm = None
    if act_order:
        # Static groups: every grid comes from the original grouping before any update.
        for grp in range(n_groups):
            scales[:, grp:grp + 1], zeros[:, grp:grp + 1] = compute_grid(W[:, grp * g:(grp + 1) * g], bits, sym)
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(n_cols)
    U = inverse_cholesky_upper(H, damp)

    Q = torch.zeros(n_rows, n_cols)  # codes, in sweep order
    loss = torch.zeros(n_rows)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(order[col]) // g
            if perm is None and col % g == 0:
                # Grid of the group entered here, on the weights as updated so far: in-block
                # columns from W1, columns past the block from W (lazy updates only).
                inside = W1[:, i:i + g]
                beyond = W[:, i2:col + g] if col + g > i2 else W1[:, :0]
                scales[:, grp:grp + 1], zeros[:, grp:grp + 1] = compute_grid(torch.cat([inside, beyond], 1), bits, sym)
            s, z = scales[:, grp], zeros[:, grp]
            w = W1[:, i]
            q = quantize_to_codes(w, s, z, bits)
            err = (w - dequantize_codes(q, s, z)) / U1[i, i]
            Q[:, col] = q
            loss += err * err
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = torch.empty_like(Q)
    codes[:, order] = Q
    return GPTQResult(codes.to(torch.int32), scales, zeros.to(torch.int32), perm, float(loss.sum()))


def gptq_quantize_shared(weights: list[torch.Tensor], hessian: torch.Tensor, **kwargs) -> list[GPTQResult]:
    """Layers that read one input (q/k/v): one stacked sweep, split back per layer.

    weights: list of float (N_i, K) sharing the Hessian (K, K). Returns one GPTQResult per
    weight (perm shared; loss is the stacked total, reported on the first result only).
    """
    sizes = [w.shape[0] for w in weights]
    stacked = gptq_quantize(torch.cat([w.float() for w in weights], 0), hessian, **kwargs)
    parts = zip(stacked.codes.split(sizes), stacked.scales.split(sizes), stacked.zeros.split(sizes))
    return [GPTQResult(c, s, z, stacked.perm, stacked.loss if i == 0 else 0.0) for i, (c, s, z) in enumerate(parts)]
