"""FADE: a per-layer propagation strength alpha from two diagnostics (docs/methods.md §5).

Everything here works on Gram matrices of one input group (fp32 running means over valid rows):
H-hat = X-hat X-hat^T / T, G = delta X-hat^T / T, D = delta delta^T / T, with delta = X - X-hat,
kept separately for two halves A and B of the calibration utterances.

Reliability (cross-fitting). C_A is the QEP correction fitted on half A. On half B the propagation
residual of strength alpha is ||W delta_B - alpha C_A X-hat_B||^2 / T_B, a quadratic in alpha:
    r_B(alpha) = tr(W D_B W^T) - 2 alpha tr(W G_B C_A^T) + alpha^2 tr(C_A H_B C_A^T).
r(alpha) averages it with the A/B-swapped version; rho = 1 - r(1) / r(0) (clipped to [0, 1]) is the
held-out fraction of the propagated error that the correction removes.

Vulnerability (grid). Quantization noise of a group with step s adds about s^2/12 * tr(H_gg) to the
output per row. The correction changes every group's range, so q(alpha) = sum_rows sum_groups
s_g(alpha)^2 / 12 * tr(H_gg), with s_g(alpha) the grid step of W + alpha C. GPTQ removes part of that
noise; to first order the same fraction for every alpha, so q is scaled by kappa, the layer's
GPTQ-to-RTN output-error ratio measured once at alpha = 0 (kappa = 1 under RTN).

alpha_l = argmin over {0, 0.05, ..., 1} of r(alpha) + kappa q(alpha). Ties go to the smallest alpha,
so a layer with no propagated error (delta = 0) keeps alpha = 0.
Ablations: "reliability" minimises r(alpha) alone; "vulnerability" replaces the cross-fitted r by
the in-sample residual (C fitted and scored on all data) plus kappa q(alpha).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fade_kernels.config import resolve_group_size
from fade_kernels.solver.grid import compute_grid
from fade_kernels.solver.qep import qep_correction
from fade_kernels.solver.stats import GramStats

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def _row_trace(left: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per output row n: (left gram right^T)[n, n]; left, right float32 (N, K), gram (K, K) -> (N,)."""
    return ((left @ gram) * right).sum(dim=1)


def _squared_norm(matrix: torch.Tensor) -> float:
    """Sum of squares of a float32 matrix, accumulated in float64."""
    return float(matrix.square().sum(dtype=torch.float64))


def residual_coefficients(weight: torch.Tensor, correction: torch.Tensor, stats: GramStats) -> torch.Tensor:
    """Per row coefficients (a, b, c) of ||W delta - alpha C X-hat||^2 / T = a - 2 alpha b + alpha^2 c.

    weight, correction: float32 (N, K); stats: the half the residual is scored on.
    Returns float64 (3, N).
    """
    a = _row_trace(weight, stats.error, weight)
    b = _row_trace(weight, stats.cross, correction)
    c = _row_trace(correction, stats.hessian, correction)
    return torch.stack([a, b, c]).double()


def cross_fitted_coefficients(weight: torch.Tensor, half_a: GramStats, half_b: GramStats, damp: float) -> torch.Tensor:
    """(a, b, c) per row of the cross-fitted residual r(alpha): C_A scored on B and C_B on A, averaged.

    weight float32 (N, K). Returns float64 (3, N).
    """
    correction_a = qep_correction(weight, half_a.hessian, half_a.cross, damp)
    correction_b = qep_correction(weight, half_b.hessian, half_b.cross, damp)
    return 0.5 * (residual_coefficients(weight, correction_a, half_b) + residual_coefficients(weight, correction_b, half_a))


def evaluate_quadratic(coefficients: torch.Tensor, alphas) -> torch.Tensor:
    """a - 2 alpha b + alpha^2 c for scalar coefficients (3,) float64 and each alpha -> float64 (len(alphas),)."""
    a, b, c = coefficients
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    return a - 2 * alphas * b + alphas ** 2 * c


def reliability(coefficients: torch.Tensor) -> float:
    """rho = 1 - r(1) / r(0) clipped to [0, 1]; 0 when there is no propagated error (r(0) = 0).

    coefficients: float64 (3,) of the cross-fitted residual summed over the layer's rows.
    """
    r0, r1 = evaluate_quadratic(coefficients, [0.0, 1.0]).tolist()
    if r0 <= 0:
        return 0.0
    return float(min(max(1.0 - r1 / r0, 0.0), 1.0))


def grid_noise_curve(weight: torch.Tensor, correction: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                     sym: bool, alphas=ALPHA_GRID) -> torch.Tensor:
    """q(alpha) per row: sum over groups of s_g(alpha)^2 / 12 * tr(H_gg) for W + alpha C.

    weight, correction: float32 (N, K); hessian float32 (K, K). Returns float64 (len(alphas), N).
    """
    rows, width = weight.shape
    group = resolve_group_size(group_size, width)
    diag_per_group = torch.diagonal(hessian).float().reshape(width // group, group).sum(dim=1).double()  # (G,)
    curves = []
    for alpha in alphas:
        grouped = (weight + float(alpha) * correction).reshape(rows * (width // group), group)
        steps = compute_grid(grouped, bits, sym).scales.reshape(rows, width // group).double()
        curves.append((steps ** 2 / 12.0 * diag_per_group).sum(dim=1))
    return torch.stack(curves)


@dataclass
class AlphaChoice:
    """FADE's decision for one layer: alpha, the diagnostics behind it, and the objective curve."""

    alpha: float
    rho: float
    vulnerability: float          # q(alpha) / q(0): how much the chosen correction widens the grid
    kappa: float                  # GPTQ-to-RTN output-error ratio at alpha = 0 (1 under RTN)
    objective: list[float]        # r(alpha) + kappa q(alpha) (or the ablation's terms) on ALPHA_GRID


def choose_alpha(cross_fitted: torch.Tensor, in_sample: torch.Tensor, noise: torch.Tensor, kappa: float,
                 rule: str = "both", alphas=ALPHA_GRID) -> AlphaChoice:
    """Pick alpha for one layer.

    cross_fitted, in_sample: float64 (3,) residual coefficients summed over the layer's rows
    (cross-fitted halves / all data); noise: float64 (len(alphas),) q(alpha) summed over rows;
    kappa: scale of the grid-noise term. rule: "both", "reliability" or "vulnerability".
    """
    if rule == "both":
        objective = evaluate_quadratic(cross_fitted, alphas) + kappa * noise
    elif rule == "reliability":
        objective = evaluate_quadratic(cross_fitted, alphas)
    elif rule == "vulnerability":
        objective = evaluate_quadratic(in_sample, alphas) + kappa * noise
    else:
        raise ValueError(f"rule must be 'both', 'reliability' or 'vulnerability', got {rule!r}")
    # Relative tolerance so that float noise on a flat objective (delta = 0) keeps alpha = 0.
    best = float(objective.min())
    scale = max(abs(float(objective[0])), 1e-30)
    index = int(torch.nonzero(objective <= best + 1e-9 * scale)[0])
    q0 = float(noise[0])
    return AlphaChoice(alpha=float(alphas[index]), rho=reliability(cross_fitted),
                       vulnerability=float(noise[index]) / q0 if q0 > 0 else 1.0, kappa=kappa,
                       objective=[float(v) for v in objective])


def relative_output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor,
                          rows: torch.Tensor | None = None) -> float:
    """sqrt(tr(dW H dW^T) / tr(W H W^T)), dW = W - W_hat: the layer's relative output error.

    weight, weight_hat: float32 (N, K); hessian: float32 (K, K), X^T X / R over the calibration rows.
    rows: optional float32 (R, K), those rows X themselves: the error is then ||X dW^T|| / ||X W^T||
    (2 R K N flops instead of 4 K^2 N, fewer when R < K; equal up to rounding)."""
    if rows is not None:
        num = _squared_norm(rows @ (weight.float() - weight_hat).t())
        den = max(_squared_norm(rows @ weight.float().t()), 1e-30)
        return (num / den) ** 0.5
    delta = weight.float() - weight_hat
    num = torch.einsum("nk,kl,nl->", delta, hessian, delta)
    den = torch.einsum("nk,kl,nl->", weight.float(), hessian, weight.float())
    return float((num / den.clamp(min=1e-30)).clamp(min=0).sqrt())


def output_error_vs_full_precision(weight: torch.Tensor, weight_hat: torch.Tensor, stats: GramStats,
                                   rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float]:
    """(||W X - W_hat X-hat|| / ||W X||, ||W delta|| / ||W X||) from Gram matrices alone.

    W X - W_hat X-hat = W delta + (W - W_hat) X-hat, so the squared norm per token is
    tr(W D W^T) + 2 tr(W G (W - W_hat)^T) + tr((W - W_hat) H (W - W_hat)^T): three terms without the
    cancellation of expanding both products. ||W X||^2 / T = tr(W (H + G + G^T + D) W^T).
    weight, weight_hat: float32 (N, K) (the original full-precision weight and the dequantized one).
    rows: optional (x_hat, delta) float32 (R, K), the rows the Gram matrices of `stats` were summed
    from; the norms are then taken on the R x N outputs directly (R K N flops instead of 5 K^2 N,
    fewer when R < K).
    """
    w = weight.float()
    diff = w - weight_hat.float()
    if rows is not None:
        x_hat, delta = rows
        propagated_out = delta @ w.t()                       # W delta, per token
        total = _squared_norm(propagated_out + x_hat @ diff.t())
        propagated = _squared_norm(propagated_out)
        reference = max(_squared_norm(propagated_out + x_hat @ w.t()), 1e-30)
        return (total / reference) ** 0.5, (propagated / reference) ** 0.5
    propagated = float(_row_trace(w, stats.error, w).double().sum())
    total = propagated + 2 * float(_row_trace(w, stats.cross, diff).double().sum()) \
        + float(_row_trace(diff, stats.hessian, diff).double().sum())
    reference = float(_row_trace(w, stats.hessian + stats.cross + stats.cross.t() + stats.error, w).double().sum())
    reference = max(reference, 1e-30)
    return (max(total, 0.0) / reference) ** 0.5, (max(propagated, 0.0) / reference) ** 0.5
