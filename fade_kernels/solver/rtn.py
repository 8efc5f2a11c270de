"""Round-to-nearest: the grid of each group applied to the weights as they are."""
from __future__ import annotations

import torch

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.numerics import check_finite
from fade_kernels.solver.grid import compute_grid, quantize_to_codes


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                 clip: str = "minmax", hessian_diag: torch.Tensor | None = None):
    """Round-to-nearest quantization of one weight matrix.

    weight: float (N, K). Returns (codes, scales, zeros):
      codes  int32  (N, K) in [0, 2^bits - 1]
      scales float32 (N, K // g), float16-representable
      zeros  int32  (N, K // g)
    so that W_hat[:, j] = (codes[:, j] - zeros[:, j // g]) * scales[:, j // g].
    clip: "minmax", "mse" or "hessian" (grid.compute_grid); hessian_diag float (K,), diag of the
    input Hessian, for clip="hessian".
    """
    validate_grid_args(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n_rows, n_cols = weight.shape
    check_finite(weight, "weight")
    g = resolve_group_size(group_size, n_cols)
    if clip == "minmax":
        grouped = weight.float().reshape(n_rows * (n_cols // g), g)  # one group per row
        scales, zeros = compute_grid(grouped, bits, sym)
    else:
        if clip == "hessian" and (hessian_diag is None or hessian_diag.shape != (n_cols,)):
            raise ValueError(f"clip='hessian' needs hessian_diag of shape ({n_cols},)")
        grids = [compute_grid(weight[:, j:j + g].float(), bits, sym, clip,
                              None if hessian_diag is None else hessian_diag[j:j + g]) for j in range(0, n_cols, g)]
        scales = torch.cat([s for s, _ in grids], 1).reshape(-1, 1)
        zeros = torch.cat([z for _, z in grids], 1).reshape(-1, 1)
        grouped = weight.float().reshape(n_rows * (n_cols // g), g)
    codes = quantize_to_codes(grouped, scales, zeros, bits)
    return (
        codes.reshape(n_rows, n_cols).to(torch.int32),
        scales.reshape(n_rows, n_cols // g),
        zeros.reshape(n_rows, n_cols // g).to(torch.int32),
    )
