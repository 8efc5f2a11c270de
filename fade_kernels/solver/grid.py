"""The quantization grid (docs/methods.md §2): per output row and per group of input columns.

Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s) clamped to [0, 2^b - 1].
Symmetric:  z = 2^(b-1),                s = max|w| / (2^(b-1) - 1).
Code q = clamp(round(w / s) + z, 0, 2^b - 1); value (q - z) * s.

Scales are rounded to float16 here, at the source, because checkpoints store them as float16:
the solver then optimises against exactly the grid that inference will use. They round up,
never down: a scale that shrank would push the group's extreme weights past the last code,
where the clamp costs up to (2^b - 1) * 2^-11 of a step (an eighth of a step at 8 bits).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fade_kernels.config import resolve_group_size, validate_grid_args

# Smallest positive float16 subnormal: a scale below it would round to 0 in the checkpoint.
_MIN_FP16_SCALE = 2.0 ** -24


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


def compute_grid(weight: torch.Tensor, bits: int, sym: bool = False) -> Grid:
    """Grid of one group per row for `weight` float32 (N, g): returns scales, zeros (N, 1).

    The asymmetric range always includes 0 so that the clamped integer zero represents it
    exactly (a group entirely above 0 would otherwise lose its top codes to the clamp).
    A row that is all zeros gets scale 1, which dequantizes every code at z back to 0.
    """
    maxq = 2 ** bits - 1
    w = weight.float()
    if sym:
        amax = w.abs().amax(dim=1, keepdim=True)
        scales = amax / (2 ** (bits - 1) - 1)
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
        degenerate = amax == 0
    else:
        wmin = w.amin(dim=1, keepdim=True).clamp(max=0.0)
        wmax = w.amax(dim=1, keepdim=True).clamp(min=0.0)
        scales = (wmax - wmin) / maxq
        degenerate = wmax == wmin
        zeros = None
    scales = torch.where(degenerate, torch.ones_like(scales), scales)
    scales = _round_up_to_float16(scales.clamp(min=_MIN_FP16_SCALE))
    if zeros is None:
        zeros = torch.round(-wmin / scales).clamp(0, maxq)
    return Grid(scales, zeros)


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
                 sym: bool = False) -> StaticGrids:
    """Static-group grids for GPTQ with act-order (docs/methods.md §3, step 2).

    weight: float (N, K) in ORIGINAL column order (dead columns already zeroed); perm: int64 (K,)
    sweep order (sweep column j is original column perm[j]), or None for the identity.
    Every group's grid comes from the original grouping before any update (compute_grid).
    """
    validate_grid_args(bits, group_size)
    n_rows, n_cols = weight.shape
    g = resolve_group_size(group_size, n_cols)
    groups = weight.float().reshape(n_rows, n_cols // g, g).transpose(0, 1).reshape(-1, g)
    scales, zeros = compute_grid(groups, bits, sym)  # rows are (group, row) pairs
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
