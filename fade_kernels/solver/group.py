"""The solve of one group of linears that read the same input, for every method.

solve_linear_group is the solvers' single entry point from the pipeline. It reads the method
from QuantConfig.spec (config.METHODS) and runs, on the stacked weight (sum N_i, K):
  1. propagation: none, QEP's global alpha, or FADE's per-layer alpha (fade_alphas), giving the
     target W + alpha C with C = W G (H + lq I)^-1 (solver/qep.py);
  2. the base solver on the target: RTN or GPTQ, after AWQ's input-channel scale search when the
     method has one (base_solve).
Pure functions on tensors: the pipeline hands in weights and statistics, never modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fade_kernels.config import QuantConfig
from fade_kernels.solver.fade import (choose_alpha, cross_fitted_coefficients, grid_noise_curve,
                                      residual_coefficients)
from fade_kernels.solver.gptq import GPTQFactor, gptq_quantize, prepare_gptq_factor
from fade_kernels.solver.grid import dequantize_grouped
from fade_kernels.solver.qep import corrected_weight, qep_correction
from fade_kernels.solver.rtn import rtn_quantize
from fade_kernels.solver.stats import GramStats


@dataclass
class LayerSolution:
    """One layer's result: codes int32 (N, K), scales float32 (N, G), zeros int32 (N, G);
    input_scale float32 (K,) or None (AWQ: the codes quantize W diag(s), the input must be divided
    by s); diagnostics for the report."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    input_scale: torch.Tensor | None = None
    alpha: float | None = None
    rho: float | None = None
    vulnerability: float | None = None
    target: torch.Tensor | None = None  # the weight the base solver quantized (W, or W + alpha C), (N, K)
    uncorrected: torch.Tensor | None = None  # FADE: the dequantized alpha = 0 solution (N, K), for "before"


def gptq_factor(stats: GramStats, config: QuantConfig, factor_cache: dict) -> GPTQFactor:
    """GPTQ's factor of the group's Hessian, built once per (damp, act_order) and kept in factor_cache."""
    key = (config.damp, config.act_order)
    if key not in factor_cache:
        factor_cache[key] = prepare_gptq_factor(stats.hessian, config.damp, config.act_order)
    return factor_cache[key]


def base_solve(stacked: torch.Tensor, stats: GramStats, act_mean_abs: torch.Tensor | None, config: QuantConfig,
               allow_input_scale: bool, factor_cache: dict):
    """Quantize the stacked weight float32 (N, K) with the method's base solver.

    allow_input_scale: False where the group's input cannot be rescaled (AWQ then falls back to
    its plain solver). factor_cache: GPTQ factors of stats.hessian already built (filled here).
    Returns (codes, scales, zeros, input_scale or None)."""
    method = config.spec
    if method.input_scale and allow_input_scale and act_mean_abs is not None:
        from fade_kernels.solver.awq import awq_quantize

        kwargs = dict(act_order=config.act_order, block_size=config.block_size, damp=config.damp) \
            if method.solver == "gptq" else {}
        codes, scales, zeros, input_scale, _ = awq_quantize(
            stacked, stats.hessian, act_mean_abs, config.bits, config.group_size, config.sym, n_grid=config.awq_grid,
            solver=method.solver, **kwargs)
        return codes, scales, zeros, input_scale
    if method.solver == "rtn":
        codes, scales, zeros = rtn_quantize(stacked, config.bits, config.group_size, config.sym, config.clip,
                                            torch.diagonal(stats.hessian) if config.clip == "hessian" else None)
        return codes, scales, zeros, None
    result = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                           act_order=config.act_order, block_size=config.block_size, damp=config.damp,
                           prepared=gptq_factor(stats, config, factor_cache), clip=config.clip)
    return result.codes, result.scales, result.zeros, None


def local_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row tr(dW H dW^T), float64 (N,)."""
    delta = weight.float() - weight_hat
    return ((delta @ hessian) * delta).sum(dim=1).double()


def solve_linear_group(weights: list[torch.Tensor], stats: GramStats | torch.Tensor, config: QuantConfig,
                       half_stats: tuple[GramStats, GramStats] | None = None, act_mean_abs: torch.Tensor | None = None,
                       excluded: list[bool] | None = None, allow_input_scale: bool = True,
                       factor_cache: dict | None = None) -> list[LayerSolution]:
    """Quantize linears sharing one input.

    weights: float (N_i, K) each, the full-precision weights. stats: the group's GramStats (or a
    float32 (K, K) Hessian for the plain methods). half_stats: FADE's cross-fitting halves.
    act_mean_abs: float32 (K,) mean |x| per input channel (AWQ). excluded: per layer, True when
    QEP must leave it uncorrected (alpha = 0). allow_input_scale: whether AWQ may rescale the
    group's input. factor_cache: a dict kept by the caller for every group with this very Hessian
    (decoder cross-attention k/v all read the encoder output): GPTQ's factor is built once and reused.
    Returns one LayerSolution per layer.
    """
    factor_cache = {} if factor_cache is None else factor_cache
    if isinstance(stats, torch.Tensor):
        stats = GramStats(stats, None, None, 0)
    method = config.spec
    sizes = [w.shape[0] for w in weights]
    stacked = torch.cat([w.detach().float() for w in weights], 0)
    layer_alphas, rhos, vulns = [None] * len(weights), [None] * len(weights), [None] * len(weights)
    uncorrected = None
    if method.propagates:
        if stats.cross is None:
            raise ValueError(f"method {config.method!r} needs the full-precision chain's statistics (G, D)")
        correction = qep_correction(stacked, stats.hessian, stats.cross, config.qep_damp)
        excluded = excluded or [False] * len(weights)
        if method.propagation == "qep":
            layer_alphas = [0.0 if skip else config.alpha for skip in excluded]
        else:
            layer_alphas, rhos, vulns, uncorrected = fade_alphas(stacked, sizes, correction, stats, half_stats, config,
                                                                 factor_cache)
        row_alpha = torch.cat([torch.full((n,), a) for n, a in zip(sizes, layer_alphas)])
        target = corrected_weight(stacked, correction, row_alpha)
    else:
        target = stacked
    codes, scales, zeros, input_scale = base_solve(target, stats, act_mean_abs, config, allow_input_scale, factor_cache)
    uncorrected = uncorrected.split(sizes) if uncorrected is not None else [None] * len(sizes)
    out = []
    for index, (c, sc, z, t) in enumerate(zip(codes.split(sizes), scales.split(sizes), zeros.split(sizes),
                                              target.split(sizes))):
        out.append(LayerSolution(c, sc, z, input_scale, layer_alphas[index], rhos[index], vulns[index], t,
                                 uncorrected[index]))
    return out


def fade_alphas(stacked, sizes, correction, stats: GramStats, half_stats, config: QuantConfig, factor_cache: dict):
    """FADE's per-layer alpha (docs/methods.md, "FADE") for the layers stacked in `stacked` (N, K).

    sizes: rows of each layer; correction: QEP's C float32 (N, K); half_stats: the cross-fitting
    halves. Returns (alphas, rhos, vulnerabilities) per layer and the dequantized alpha = 0
    solution float32 (N, K)."""
    if half_stats is None:
        raise ValueError("FADE needs the statistics of both calibration halves")
    half_a, half_b = half_stats
    cross_fitted = cross_fitted_coefficients(stacked, half_a, half_b, config.qep_damp)
    in_sample = residual_coefficients(stacked, correction, stats)
    noise = grid_noise_curve(stacked, correction, stats.hessian, config.bits, config.group_size, config.sym)
    rtn0 = dequantize_grouped(*rtn_quantize(stacked, config.bits, config.group_size, config.sym))
    uncorrected = rtn0
    with_gptq = config.spec.solver == "gptq"
    if with_gptq:
        # GPTQ removes part of the grid noise; measure how much once, at alpha = 0, per layer.
        gptq0 = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                              act_order=config.act_order, block_size=config.block_size, damp=config.damp,
                              prepared=gptq_factor(stats, config, factor_cache), clip=config.clip)
        uncorrected = dequantize_grouped(gptq0.codes, gptq0.scales, gptq0.zeros)
        err_gptq = local_error(stacked, uncorrected, stats.hessian)
        err_rtn = local_error(stacked, rtn0, stats.hessian)
    alphas, rhos, vulns = [], [], []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        kappa = 1.0
        if with_gptq:
            kappa = float(err_gptq[rows].sum() / err_rtn[rows].sum().clamp(min=1e-30))
        choice = choose_alpha(cross_fitted[:, rows].sum(dim=1), in_sample[:, rows].sum(dim=1),
                              noise[:, rows].sum(dim=1), kappa, config.fade_rule)
        alphas.append(choice.alpha)
        rhos.append(choice.rho)
        vulns.append(choice.vulnerability)
    return alphas, rhos, vulns, uncorrected
