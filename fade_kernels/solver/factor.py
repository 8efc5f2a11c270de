"""The factor the GPTQ sweep needs: U upper triangular with U^T U = (H + lambda I)^-1.

Two ways to get it, both returning the same U (the Cholesky factor is unique once its diagonal
is positive), so they differ only by float rounding:

"three_step" (the usual recipe, about 5n^3/3 flops): L = chol(H), H^-1 = cholesky_inverse(L),
    U = chol(H^-1, upper).

"reversed" (about 2n^3/3 flops): with J the index-reversal permutation (J = J^T = J^-1),
    J H J = L L^T                   (one Cholesky of the reversed matrix, L lower)
    H     = (J L J)(J L J)^T        (J L J is upper triangular: reversal maps lower to upper)
    H^-1  = (J L J)^-T (J L J)^-1 = U^T U   with   U = (J L J)^-1 = J L^-1 J,
    which is upper triangular with positive diagonal 1 / diag(L) reversed, hence the upper
    Cholesky factor of H^-1. So U is L^-1 with both indices reversed: one Cholesky (n^3/3) and
    one triangular inverse (n^3/3, done by recursive halving so that the work is matrix-matrix).

Worked 2x2 example: H = [[2, 1], [1, 2]]: J H J = H, L = [[1.414, 0], [0.707, 1.225]],
L^-1 = [[0.707, 0], [-0.408, 0.816]], reversed: U = [[0.816, -0.408], [0, 0.707]], and
U^T U = [[2, -1], [-1, 2]] / 3 = H^-1.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

FACTOR_METHODS = ("reversed", "three_step")

# Below this size the triangular inverse is one triangular solve against the identity; above
# it the recursion turns the work into two half-size solves per level (measured on 2 AVX-512
# cores: 256 and 512 are equally fast, 128 is 5% slower at K = 5120).
_TRI_INV_BASE = 256


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, same dtype and shape (K, K) as hessian."""
    lam = damp * torch.diagonal(hessian).mean()
    out = hessian.clone()
    out.diagonal().add_(lam)
    return out


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 for a lower-triangular L float (K, K) with nonzero diagonal; same dtype, lower.

    Halving L = [[A, 0], [B, C]] gives L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]: the corner
    costs two half-size triangular solves, so the total is n^3/3 flops like LAPACK's trtri,
    where one solve against the identity would cost n^3.
    """
    n = lower.shape[0]
    if n <= _TRI_INV_BASE:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    h = n // 2
    A, B, C = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    out = torch.zeros_like(lower)
    out[:h, :h] = lower_triangular_inverse(A)
    out[h:, h:] = lower_triangular_inverse(C)
    C_inv_B = torch.linalg.solve_triangular(C, B, upper=False)                          # C^-1 B
    out[h:, :h] = -torch.linalg.solve_triangular(A, C_inv_B, upper=False, left=False)  # (C^-1 B) A^-1
    return out


def _upper_three_step(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, bool]:
    lower, info = torch.linalg.cholesky_ex(damped_hessian(hessian, damp))
    if int(info) != 0:
        return lower, False
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper, int(info) == 0


def _upper_reversed(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, bool]:
    # J H^T J rather than J H J: equal for a symmetric H, but a float32 X X^T is symmetric only
    # up to rounding, and the lower triangle of J H^T J (the one LAPACK reads) is H's lower
    # triangle, the one the three-step recipe reads, so both methods factor the same matrix.
    # flip() copies, so the damping can go straight onto the copy's diagonal.
    reversed_h = hessian.mT.flip(0, 1)
    reversed_h.diagonal().add_(damp * torch.diagonal(hessian).mean())
    lower, info = torch.linalg.cholesky_ex(reversed_h)  # J H J = L L^T
    if int(info) != 0:
        return lower, False
    upper = lower_triangular_inverse(lower).flip(0, 1)  # U = J L^-1 J
    # The three-step recipe notices a numerically indefinite H^-1 in its second Cholesky; here
    # the same breakdown would show up as inf/nan in the inverse (one sum finds either).
    return upper, bool(torch.isfinite(upper.sum()))


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float, method: str = "reversed") -> torch.Tensor:
    """Upper-triangular U with U^T U = (H + lambda I)^-1, lambda = damp * mean(diag H).

    hessian: float32 or float64 (K, K), symmetric. Returns U in the same dtype, (K, K).
    method: "reversed" (one Cholesky of the index-reversed H and one triangular inverse) or
    "three_step" (Cholesky, cholesky_inverse, Cholesky); see the module docstring.
    If the damped H is not positive definite (e.g. too few calibration tokens), the damping is
    raised tenfold up to three times before giving up, and a warning says so.
    """
    if method not in FACTOR_METHODS:
        raise ValueError(f"method must be one of {FACTOR_METHODS}, got {method!r}")
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (K, K), got shape {tuple(hessian.shape)}")
    factorize = _upper_reversed if method == "reversed" else _upper_three_step
    for _ in range(4):
        upper, ok = factorize(hessian, damp)
        if ok:
            return upper
        log.warning("Hessian not positive definite with damp=%g; retrying with damp=%g", damp, damp * 10)
        damp *= 10
    raise RuntimeError("Hessian is not positive definite even with heavy damping; "
                       "is the calibration data empty or constant?")
