"""The quantization grid (docs/methods.md §2): per output row and per group of input columns.

Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s) clamped to [0, 2^b - 1].
Symmetric:  z = 2^(b-1),                s = max|w| / (2^(b-1) - 1).
Code q = clamp(round(w / s) + z, 0, 2^b - 1); value (q - z) * s.

Clipping (`clip`): min-max puts the extreme weights of a group on the end codes. At 3 bits that
step is coarse for the bulk of the group, so "mse" and "hessian" search a grid of shrink factors
p in CLIP_SHRINK (1.0 down to 0.5): the range [p min, p max] (symmetric: p max|w|) gives a
candidate grid, and each row keeps the candidate with the least squared rounding error over the
group, unweighted ("mse") or with each column weighted by its Hessian diagonal ("hessian", the
output energy that column carries). p = 1 is the min-max grid and wins ties, so a search never
picks a worse grid than min-max under its own error measure.

Scales are rounded to float16 here, at the source, because checkpoints store them as float16:
the solver then optimises against exactly the grid that inference will use. They round up,
never down: a scale that shrank would push the group's extreme weights past the last code,
where the clamp costs up to (2^b - 1) * 2^-11 of a step (an eighth of a step at 8 bits).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fade_kernels.config import CLIP_METHODS, resolve_group_size, validate_grid_args
from fade_kernels.numerics import check_float16_scales

# Smallest positive float16 subnormal: a scale below it would round to 0 in the checkpoint.
_MIN_FP16_SCALE = 2.0 ** -24


CLIP_SHRINK = tuple(1.0 - 0.025 * i for i in range(21))


class StaticGrids(NamedTuple):
    """Act-order with static groups: scales float32 (N, G) and zeros float32 (N, G, integer-valued)
    computed before the sweep; column_group int64 (K,): the group of each sweep column."""

    scales: torch.Tensor
    zeros: torch.Tensor
    column_group: torch.Tensor


class Grid(NamedTuple):
    """scales: float32 (N, G), float16-representable; zeros: float32 (N, G), integer-valued."""

    scales: torch.Tensor
    zeros: torch.Tensor


def compute_grid(weight: torch.Tensor, bits: int, sym: bool = False, clip: str = "minmax",
                 column_weight: torch.Tensor | None = None) -> Grid:
    """Grid of one group per row for `weight` float32 (N, g): returns scales, zeros (N, 1).

    The asymmetric range always includes 0 so that the clamped integer zero represents it
    exactly (a group entirely above 0 would otherwise lose its top codes to the clamp).
    A row that is all zeros gets scale 1, which dequantizes every code at z back to 0.
    clip: "minmax" (the group's range), "mse" or "hessian" (the best shrunk range, see the
    module docstring). column_weight: float32 (g,), the Hessian diagonal of the group's
    columns; required for clip="hessian", ignored otherwise.
    """
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    w = weight.float()
    if sym:
        amax = w.abs().amax(dim=1, keepdim=True)
        lo, hi = -amax, amax
    else:
        lo = w.amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = w.amax(dim=1, keepdim=True).clamp(min=0.0)
    best = _grid_from_range(lo, hi, bits, sym)
    if clip == "minmax":
        return best
    if clip == "hessian":
        if column_weight is None or column_weight.shape != (w.shape[1],):
            raise ValueError(f"clip='hessian' needs column_weight of shape ({w.shape[1]},)")
        col = column_weight.float().clamp(min=0.0).unsqueeze(0)
    else:
        col = None
    best_err = _rounding_error(w, best, bits, col)
    for shrink in CLIP_SHRINK[1:]:
        cand = _grid_from_range(lo * shrink, hi * shrink, bits, sym)
        err = _rounding_error(w, cand, bits, col)
        better = err < best_err
        best = Grid(torch.where(better, cand.scales, best.scales), torch.where(better, cand.zeros, best.zeros))
        best_err = torch.where(better, err, best_err)
    return best


def _grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool) -> Grid:
    """Scales and zeros float32 (N, 1) covering [lo, hi] (lo <= 0 <= hi, both (N, 1))."""
    maxq = 2 ** bits - 1
    if sym:
        scales = hi / (2 ** (bits - 1) - 1)
        degenerate = hi == 0
    else:
        scales = (hi - lo) / maxq
        degenerate = hi == lo
    scales = torch.where(degenerate, torch.ones_like(scales), scales)
    check_float16_scales(scales)
    scales = _round_up_to_float16(scales.clamp(min=_MIN_FP16_SCALE))
    if sym:
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    else:
        zeros = torch.round(-lo / scales).clamp(0, maxq)
    return Grid(scales, zeros)


def _rounding_error(w: torch.Tensor, grid: Grid, bits: int, column_weight: torch.Tensor | None) -> torch.Tensor:
    """Per row sum of (w - dequantized w)^2, each column weighted if given: float32 (N, 1)."""
    delta = w - dequantize_codes(quantize_to_codes(w, grid.scales, grid.zeros, bits), grid.scales, grid.zeros)
    sq = delta * delta
    if column_weight is not None:
        sq = sq * column_weight
    return sq.sum(dim=1, keepdim=True)


def _round_up_to_float16(values: torch.Tensor) -> torch.Tensor:
    """The smallest float16-representable value >= each positive float32 value."""
    rounded = values.half()
    below = rounded.float() < values
    bumped = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(below, bumped, rounded).float()


def quantize_to_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes float32 (same shape as weight), integer-valued in [0, 2^bits - 1].

    weight (N, C) float32; scales/zeros broadcastable to it (e.g. (N, 1)).
    """
    return torch.clamp(torch.round(weight / scales) + zeros, 0, 2 ** bits - 1)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(codes - zeros) * scales, float32, with the same broadcasting as quantize_to_codes."""
    return (codes.float() - zeros) * scales


def expand_groups(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, G) -> (N, G * group_size): repeat each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The weight a grouped grid represents: W_hat[:, j] = (codes[:, j] - zeros[:, j // g]) * scales[:, j // g].

    codes: integer (N, K); scales: float32 (N, G); zeros: integer or integer-valued float (N, G);
    g = K / G. Returns float32 (N, K)."""
    group = codes.shape[1] // scales.shape[1]
    return dequantize_codes(codes, expand_groups(scales, group), expand_groups(zeros.float(), group))


def static_group_grids(weight: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int,
                       sym: bool = False, clip: str = "minmax",
                       column_weight: torch.Tensor | None = None) -> StaticGrids:
    """Static-group grids for GPTQ with act-order (docs/methods.md §3, step 2).

    weight: float (N, K) in ORIGINAL column order (dead columns already zeroed); perm: int64 (K,)
    sweep order (sweep column j is original column perm[j]), or None for the identity.
    Every group's grid comes from the original grouping before any update (compute_grid, with
    `clip`; column_weight float (K,) in original order is the Hessian diagonal clip="hessian" needs).
    """
    validate_grid_args(bits, group_size)
    n_rows, n_cols = weight.shape
    g = resolve_group_size(group_size, n_cols)
    if clip == "hessian":
        if column_weight is None:
            raise ValueError("clip='hessian' needs column_weight (the Hessian diagonal, shape (K,))")
        grids = [compute_grid(weight[:, i:i + g], bits, sym, clip, column_weight[i:i + g])
                 for i in range(0, n_cols, g)]
        scales = torch.cat([grid.scales for grid in grids], 1)
        zeros = torch.cat([grid.zeros for grid in grids], 1)
    else:
        groups = weight.float().reshape(n_rows, n_cols // g, g).transpose(0, 1).reshape(-1, g)
        scales, zeros = compute_grid(groups, bits, sym, clip)  # rows are (group, row) pairs
        scales = scales.reshape(n_cols // g, n_rows).t().contiguous()
        zeros = zeros.reshape(n_cols // g, n_rows).t().contiguous()
    order = torch.arange(n_cols, device=weight.device) if perm is None else perm.to(weight.device)
    return StaticGrids(scales, zeros, order // g)


def check_static_grids(grids: StaticGrids, n_rows: int, n_cols: int, n_groups: int) -> None:
    """Raise a ValueError naming the field when `grids` does not fit an (n_rows, n_cols) sweep
    with n_groups groups per row."""
    scales, zeros, column_group = grids
    if tuple(scales.shape) != (n_rows, n_groups) or tuple(zeros.shape) != (n_rows, n_groups):
        raise ValueError(f"static_grids scales/zeros must have shape ({n_rows}, {n_groups}), got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    if tuple(column_group.shape) != (n_cols,):
        raise ValueError(f"static_grids.column_group must have shape ({n_cols},), got {tuple(column_group.shape)}")
    if n_cols and (int(column_group.min()) < 0 or int(column_group.max()) >= n_groups):
        raise ValueError(f"static_grids.column_group must lie in [0, {n_groups}), got values in "
                         f"[{int(column_group.min())}, {int(column_group.max())}]")
