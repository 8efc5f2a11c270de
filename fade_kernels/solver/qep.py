"""QEP: quantization error propagation (docs/methods.md §4), as pure functions on Gram matrices.

A layer y = W x sees X-hat on the quantized chain and X on the full-precision chain, with
delta = X - X-hat. Aiming the quantized layer at the full-precision output,
min_W' ||W X - W' X-hat||^2 + lambda_q T ||W' - W||^2, has the closed form

    W' = W + W G (H-hat + lambda_q I)^-1,     G = delta X-hat^T / T,  H-hat = X-hat X-hat^T / T,

and QEP moves only part of the way: W*(alpha) = W + alpha * C with C = W G (H-hat + lambda_q I)^-1.
The ridge keeps C small where H-hat is nearly singular (dead or collinear inputs) and is the
QEP paper's regulariser (lambda_q = 1.0 x mean diag H-hat in its code, 0.01 in its library).
"""
from __future__ import annotations

import torch


def ridge(hessian: torch.Tensor, damp: float) -> float:
    """lambda_q = damp * mean(diag(hessian)); a hessian with zero diagonal gets lambda_q = damp."""
    mean_diag = float(torch.diagonal(hessian).mean())
    return damp * mean_diag if mean_diag > 0 else damp


def qep_correction(weight: torch.Tensor, hessian: torch.Tensor, cross_gram: torch.Tensor, damp: float = 1.0) -> torch.Tensor:
    """C = W G (H + lambda_q I)^-1, solved with a Cholesky factorisation (never an explicit inverse).

    weight: float (N, K), the layer's full-precision weight (several layers sharing the input may be
    stacked along N: the correction is row-wise). hessian: float32 (K, K), H-hat. cross_gram:
    float32 (K, K), G = delta X-hat^T / T. damp: lambda_q as a fraction of mean diag H-hat.
    Returns C float32 (N, K). W + C minimises ||W X - W' X-hat||^2 + lambda_q T ||W' - W||^2.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]) or cross_gram.shape != hessian.shape:
        raise ValueError(f"weight (N, K), hessian (K, K) and cross_gram (K, K) expected; got {tuple(weight.shape)}, "
                         f"{tuple(hessian.shape)}, {tuple(cross_gram.shape)}")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp!r}")
    width = hessian.shape[0]
    regularised = hessian.float() + ridge(hessian, damp) * torch.eye(width, dtype=torch.float32)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) != 0:
        # float32 lost positive definiteness (tiny damp on a rank-deficient H): retry in float64.
        factor = torch.linalg.cholesky(regularised.double())
    target = (weight.to(factor.dtype) @ cross_gram.to(factor.dtype)).t()  # (K, N): (W G)^T
    # M symmetric: C = (W G) M^-1 = (M^-1 (W G)^T)^T.
    return torch.cholesky_solve(target, factor).t().float().contiguous()


def corrected_weight(weight: torch.Tensor, correction: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """W*(alpha) = W + alpha * C. alpha: a float, or float32 (N,) per output row. Returns float32 (N, K)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if alpha.dim() == 1:
        alpha = alpha[:, None]
    return weight.float() + alpha * correction
