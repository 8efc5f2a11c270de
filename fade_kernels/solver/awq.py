"""AWQ (arXiv 2306.00978) as pure functions on tensors: activation-aware input-channel scales.

Layers that read one input x (K,) share a stacked weight W (N, K). AWQ multiplies every input
channel k of the weight by s_k before quantizing and divides the input by the same s_k, so that

    y = W x = (W diag(s)) (diag(s)^-1 x)   ~   Q(W diag(s)) (x / s).

Channels that carry large activations get s_k > 1: their weights are spread over more of the
group's grid, so their relative rounding error shrinks, and the error that remains is divided
by s_k again on the way back. The weight actually represented is W_hat = Q(W diag(s)) diag(s)^-1.

Search (one exponent for the whole group, as in the paper):
    a_k   = mean |x_k| over the calibration rows            (act_mean_abs, (K,))
    s(b)  = a^b / sqrt(max(a^b) * min(a^b)),  b in {0, 1/n, ..., (n-1)/n}
    E(b)  = W - Q(W diag(s(b))) diag(s(b))^-1
    loss  = ||E X||^2 / T = tr(E H E^T),  H = X X^T / T     (K, K): no activations needed
b = 0 gives s = 1, plain RTN, and is always a candidate, so the chosen loss is never above RTN's.

Normalisation: sqrt(max * min) = 1 as AutoAWQ does. Q is invariant to a common factor of s up
to the float16 rounding of the grid, so the normalisation only places the scales symmetrically
around 1 in log space, where a float16 copy (a LayerNorm weight divided by s, a stored input
scale) loses the least. s itself is rounded to float16-representable values for the same reason:
a checkpoint that stores it in float16 reproduces exactly the scaled weight that was quantized.

Clip (optional, after the scale search, again as the paper does): per output row and group,
shrink the grid's range of the scaled weight to r * [min, max] for r in {1, 0.95, ..., 0.55}
and keep the r with the lowest loss for that group's slice, e_g H'_gg e_g^T with H' the Hessian
of the scaled problem. That per-group loss ignores the coupling between groups through H's
off-diagonal blocks, so the clipped result is kept only if its full loss tr(E H E^T) is lower
than the unclipped one. Clipping is a choice of RTN grid; GPTQ picks its own grids on the
weights it has already updated, so with solver="gptq" no clip is applied (see awq_quantize).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.solver.gptq import gptq_quantize
from fade_kernels.solver.grid import compute_grid, dequantize_codes, dequantize_grouped, quantize_to_codes

# Channels whose mean |x| is below this fraction of the largest one are treated as if they had
# it: a dead channel (a_k = 0) would otherwise get s_k = 0 and a division by zero, and a nearly
# dead one an enormous 1/s_k that amplifies any activation the calibration set did not show.
_ACT_FLOOR_REL = 1e-4
# Range-shrink factors of the clip search: AWQ's max_shrink 0.5 on a 20-point grid.
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))


class AwqResult(NamedTuple):
    """What the AWQ search chose for one group of layers sharing an input of width K.

    input_scale float32 (K,): s, float16-representable; the weight quantized is W diag(s) and
      inference computes y = Q(W diag(s)) (x / s).
    beta: the chosen exponent (0.0 means s = 1, plain RTN).
    loss_rtn: tr(E H E^T) of plain RTN (b = 0, no clip), float32 arithmetic.
    loss_awq: the same loss for the chosen scales (and clip, if kept); <= loss_rtn.
    clip_ratios float32 (N, G) or None: per row and group, the range-shrink factor applied to
      the scaled weight before RTN (None when the clip was off, not kept, or solver="gptq").
    grid_losses float32 (n_grid,): loss of each candidate exponent b = i / n_grid, no clip.
    loss_final: the loss of the weight finally returned by awq_quantize (GPTQ's, for
      solver="gptq"); None from awq_search alone.
    """

    input_scale: torch.Tensor
    beta: float
    loss_rtn: float
    loss_awq: float
    clip_ratios: torch.Tensor | None
    grid_losses: torch.Tensor
    loss_final: float | None = None


def gram_loss(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(E H E^T) = ||E X||^2 / T for H = X X^T / T, as a 0-d tensor in the inputs' dtype.

    error: float (N, K), W - W_hat. hessian: float (K, K), symmetric.
    """
    return ((error @ hessian) * error).sum()


def awq_scales(act_mean_abs: torch.Tensor, beta: float) -> torch.Tensor:
    """Input-channel scales s = a^beta normalised to sqrt(max * min) = 1, float32 (K,).

    act_mean_abs: float (K,), mean |x_k| over calibration rows, >= 0. Values below
    1e-4 x the largest are raised to it first (dead channels). Rounded to float16-representable
    values; beta = 0 gives exactly 1 everywhere.
    """
    a = act_mean_abs.detach().float()
    # A group that saw no activation at all has nothing to be aware of: every channel equal.
    floor = max(float(a.max()) * _ACT_FLOOR_REL, 1e-30)
    s = a.clamp(min=floor).pow(beta)
    s = s / (s.max() * s.min()).sqrt()
    return s.half().float()


def _fake_quant_rtn(scaled: torch.Tensor, bits: int, g: int, sym: bool,
                    ratios: torch.Tensor | None = None):
    """RTN of `scaled` float32 (N, K) with groups of g, each group's range optionally shrunk.

    ratios: float32 (N, G) or a float, the shrink factor per row and group (None = 1).
    Returns (codes float32 (N*G, g), scales (N*G, 1), zeros (N*G, 1), dequantized (N, K)).
    """
    n_rows, n_cols = scaled.shape
    grouped = scaled.reshape(n_rows * (n_cols // g), g)  # one group per row
    if ratios is not None:
        r = ratios.reshape(-1, 1) if isinstance(ratios, torch.Tensor) else ratios
        if sym:
            hi = grouped.abs().amax(1, keepdim=True) * r
            lo = -hi
        else:
            # The same range compute_grid would use (it always contains 0), shrunk about 0.
            lo = grouped.amin(1, keepdim=True).clamp(max=0.0) * r
            hi = grouped.amax(1, keepdim=True).clamp(min=0.0) * r
        grouped = torch.maximum(torch.minimum(grouped, hi), lo)
    scales, zeros = compute_grid(grouped, bits, sym)
    codes = quantize_to_codes(grouped, scales, zeros, bits)
    return codes, scales, zeros, dequantize_codes(codes, scales, zeros).reshape(n_rows, n_cols)


def _diagonal_blocks(hessian: torch.Tensor, g: int) -> torch.Tensor:
    """(K, K) -> (G, g, g): the Hessian blocks of each group with itself."""
    n_groups = hessian.shape[0] // g
    return hessian.reshape(n_groups, g, n_groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _clip_search(scaled: torch.Tensor, hessian_scaled: torch.Tensor, bits: int, g: int, sym: bool) -> torch.Tensor:
    """Per row and group, the shrink factor in CLIP_RATIOS with the lowest slice loss.

    scaled: float32 (N, K), W diag(s). hessian_scaled: float32 (K, K), diag(1/s) H diag(1/s).
    Returns float32 (N, G). Ties keep the larger ratio (1.0 first), i.e. no clip.
    """
    n_rows, n_cols = scaled.shape
    n_groups = n_cols // g
    blocks = _diagonal_blocks(hessian_scaled, g)                     # (G, g, g)
    best_loss = torch.full((n_rows, n_groups), float("inf"), device=scaled.device)
    best_ratio = torch.ones(n_rows, n_groups, device=scaled.device)
    for r in CLIP_RATIOS:
        err = (scaled - _fake_quant_rtn(scaled, bits, g, sym, r)[3]).reshape(n_rows, n_groups, g)
        loss = torch.einsum("ngi,gij,ngj->ng", err, blocks, err)     # (N, G)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def _validate(weight, hessian, act_mean_abs, bits, group_size, n_grid) -> int:
    """Check the shared arguments; return the effective group width."""
    validate_grid_args(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n_cols = weight.shape[1]
    if tuple(hessian.shape) != (n_cols, n_cols):
        raise ValueError(f"hessian must have shape ({n_cols}, {n_cols}) to match weight's K, got {tuple(hessian.shape)}")
    if tuple(act_mean_abs.shape) != (n_cols,):
        raise ValueError(f"act_mean_abs must have shape ({n_cols},) to match weight's K, got {tuple(act_mean_abs.shape)}")
    if not bool(torch.isfinite(act_mean_abs).all()) or bool((act_mean_abs < 0).any()):
        raise ValueError("act_mean_abs must be finite and >= 0 (it is a mean of |x|)")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid!r}")
    return resolve_group_size(group_size, n_cols)


@torch.no_grad()
def awq_search(weight: torch.Tensor, hessian: torch.Tensor, act_mean_abs: torch.Tensor, bits: int = 4,
               group_size: int = 128, sym: bool = False, n_grid: int = 20, clip: bool = True) -> AwqResult:
    """Search AWQ's input-channel scales (and optionally clip ratios) for one group of layers.

    weight: float (N, K), the stacked weights of the layers reading this input.
    hessian: float (K, K), X X^T / T over the calibration rows of that input.
    act_mean_abs: float (K,), mean |x_k| over the same rows.
    n_grid: exponents b = i / n_grid for i in 0..n_grid-1 are tried. clip: run the clip search.
    Returns an AwqResult (see its docstring); loss_awq <= loss_rtn always.
    """
    g = _validate(weight, hessian, act_mean_abs, bits, group_size, n_grid)
    W = weight.detach().float()
    H = hessian.detach().float().to(W.device)
    act = act_mean_abs.detach().float().to(W.device)

    grid_losses = torch.empty(n_grid, device=W.device)
    best = (0, None)
    for i in range(n_grid):
        s = awq_scales(act, i / n_grid)
        w_hat = _fake_quant_rtn(W * s, bits, g, sym)[3] / s
        grid_losses[i] = gram_loss(W - w_hat, H)
        # Strictly lower only: on a tie the smaller exponent (b = 0 is plain RTN) wins.
        if i == 0 or grid_losses[i] < grid_losses[best[0]]:
            best = (i, s)
    i_best, s = best
    loss_rtn, loss_awq = float(grid_losses[0]), float(grid_losses[i_best])

    clip_ratios = None
    if clip:
        scaled = W * s
        ratios = _clip_search(scaled, H / torch.outer(s, s), bits, g, sym)
        w_hat = _fake_quant_rtn(scaled, bits, g, sym, ratios)[3] / s
        loss_clip = float(gram_loss(W - w_hat, H))
        if loss_clip < loss_awq:  # the slice losses ignore cross-group terms: check the whole
            clip_ratios, loss_awq = ratios, loss_clip
    return AwqResult(s, i_best / n_grid, loss_rtn, loss_awq, clip_ratios, grid_losses.cpu())


@torch.no_grad()
def awq_quantize(weight: torch.Tensor, hessian: torch.Tensor, act_mean_abs: torch.Tensor, bits: int = 4,
                 group_size: int = 128, sym: bool = False, n_grid: int = 20, clip: bool = True,
                 solver: str = "rtn", **gptq_kwargs):
    """AWQ scales, then RTN (with the searched clip) or GPTQ on the scaled weight W diag(s).

    weight: float (N, K); hessian: float (K, K) = X X^T / T; act_mean_abs: float (K,) mean |x_k|.
    solver: "rtn" or "gptq"; gptq_kwargs (act_order, block_size, damp) go to gptq_quantize,
    which solves the scaled problem min ||(W s - W') (X / s)||^2 with Hessian
    diag(1/s) H diag(1/s). With "gptq", clip is ignored (GPTQ chooses its own grids; the scale
    search is still scored with RTN, as is usual for AWQ followed by GPTQ).
    Returns (codes, scales, zeros, input_scale, result):
      codes  int32   (N, K) in [0, 2^bits - 1], codes of W diag(s)
      scales float32 (N, K // g), float16-representable
      zeros  int32   (N, K // g)
      input_scale float32 (K,): inference computes y = W_q (x / input_scale), where
        W_q[:, j] = (codes[:, j] - zeros[:, j // g]) * scales[:, j // g]
      result AwqResult, with loss_final = tr(E H E^T) of W_q diag(1/s) against W.
    """
    if solver not in ("rtn", "gptq"):
        raise ValueError(f"solver must be 'rtn' or 'gptq', got {solver!r}")
    if solver == "rtn" and gptq_kwargs:
        raise ValueError(f"GPTQ options {sorted(gptq_kwargs)} given with solver='rtn'")
    result = awq_search(weight, hessian, act_mean_abs, bits, group_size, sym, n_grid,
                        clip=clip and solver == "rtn")
    W = weight.detach().float()
    H = hessian.detach().float().to(W.device)
    s = result.input_scale
    n_rows, n_cols = W.shape
    g = resolve_group_size(group_size, n_cols)
    if solver == "rtn":
        codes, scales, zeros, w_q = _fake_quant_rtn(W * s, bits, g, sym, result.clip_ratios)
        codes = codes.reshape(n_rows, n_cols).to(torch.int32)
        scales = scales.reshape(n_rows, n_cols // g)
        zeros = zeros.reshape(n_rows, n_cols // g).to(torch.int32)
    else:
        out = gptq_quantize(W * s, H / torch.outer(s, s), bits=bits, group_size=group_size, sym=sym, **gptq_kwargs)
        codes, scales, zeros = out.codes, out.scales, out.zeros
        w_q = dequantize_grouped(codes, scales, zeros)
    loss_final = float(gram_loss(W - w_q / s, H))
    return codes, scales, zeros, s, result._replace(loss_final=loss_final)


def _rescale(param: torch.Tensor, input_scale: torch.Tensor, divide: bool) -> None:
    """param /= s (divide) or param *= s, in place, computed in at least float32 whatever the
    parameter's dtype (a float16 model would otherwise round twice), then rounded back once."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    s = input_scale.detach().to(device=param.device, dtype=dtype)
    value = param.to(dtype) / s if divide else param.to(dtype) * s
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def divide_norm_by_input_scale(norm: nn.Module, input_scale: torch.Tensor) -> None:
    """norm.weight = w / s and norm.bias = b / s (in place): the norm's output becomes LN(x) / s.

    norm: a LayerNorm (or RMSNorm) with an affine weight (K,) and optional bias (K,).
    input_scale: float (K,), finite and > 0.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError("norm must have a 1-D affine weight (elementwise_affine=True) to fold a scale into")
    k = weight.shape[0]
    if tuple(input_scale.shape) != (k,):
        raise ValueError(f"input_scale must have shape ({k},) to match the norm's width, got {tuple(input_scale.shape)}")
    if not bool(torch.isfinite(input_scale).all()) or bool((input_scale <= 0).any()):
        raise ValueError("input_scale must be finite and > 0")
    _rescale(weight, input_scale, divide=True)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        _rescale(bias, input_scale, divide=True)


@torch.no_grad()
def fold_input_scale_into_layernorm(norm: nn.Module, linears: list[nn.Linear], input_scale: torch.Tensor) -> None:
    """Fold AWQ's input scale into the norm that feeds `linears` (in place).

    norm: a LayerNorm (or RMSNorm) with an affine weight (K,) and optional bias (K,); it must
      feed only these linears, since its output becomes LN(x) / s for every reader.
    linears: the nn.Linear layers reading it, each with in_features == K.
    input_scale: float (K,), s from awq_search / awq_quantize.
    Afterwards norm.weight = w / s, norm.bias = b / s and each linear's weight is W diag(s), so
    the model computes the same function (up to rounding) and the linears' weights are exactly
    what awq_quantize quantized; no input scale is left for inference.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError("norm must have a 1-D affine weight (elementwise_affine=True) to fold a scale into")
    k = weight.shape[0]
    if not linears:
        raise ValueError("linears must name at least one layer reading the norm")
    for i, linear in enumerate(linears):
        if linear.weight.dim() != 2 or linear.weight.shape[1] != k:
            raise ValueError(f"linears[{i}] has in_features={linear.weight.shape[-1]}, the norm's width is {k}")
    divide_norm_by_input_scale(norm, input_scale)
    for linear in linears:
        _rescale(linear.weight, input_scale, divide=False)
