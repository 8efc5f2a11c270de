"""quantize_model: orchestration of the block-by-block pipeline (background §4, §7).

Lifecycle, per stack (encoder first, then decoder):
  1. capture the first block's inputs for every calibration batch (a hook stops the forward);
  2. per block, per true-sequential group: run the block over all batches with a Hessian hook
     on the group's shared input (masked rows dropped), solve the group with RTN or GPTQ
     (stacked weights, one sweep), and write the dequantized weights into the live block so
     the next group sees the quantized upstream;
  3. run the quantized block once more to produce the next block's inputs.
The decoder's cross-attention reads the quantized encoder's output. At the end every solved
nn.Linear is swapped for a QuantLinear built from the codes.
"""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.capture import GramAccumulator, StopForward, capture_block_inputs, run_block
from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig
from fade_kernels.models.adapters import ENCODER_FRAMES, OWN_TOKENS, ModelAdapter, get_adapter
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.solver.fade import (GramStats, choose_alpha, cross_fitted_coefficients, grid_noise_curve,
                                     output_error_vs_full_precision, residual_coefficients)
from fade_kernels.solver.gptq import gptq_quantize
from fade_kernels.solver.qep import corrected_weight, qep_correction
from fade_kernels.solver.grid import expand_groups
from fade_kernels.solver.rtn import rtn_quantize


@dataclass
class LayerReport:
    """Diagnostics of one quantized linear layer, all measured on the calibration rows.

    rel_output_error: local error sqrt(tr(dW H dW^T) / tr(W H W^T)) with dW = W - W_hat and H the
      quantized chain's input Gram matrix (what GPTQ minimises).
    The fields below need the full-precision chain (QEP/FADE, or track_fp_error=True); else None:
    rel_error_fp: ||W X - W_hat X_hat|| / ||W X||, the error against the full-precision output.
    rel_error_fp_uncorrected: the same for the alpha = 0 solution (plain GPTQ/RTN of W), i.e.
      "before" the correction; equals rel_error_fp when alpha = 0.
    propagated_error: ||W delta|| / ||W X||, the upstream error this layer inherits (delta = X - X_hat).
    alpha: propagation strength used; rho: FADE's cross-fitted reliability in [0, 1];
    vulnerability: FADE's grid-noise term q(alpha) / q(0) at the chosen alpha (1.0 at alpha = 0).
    """

    name: str
    shape: tuple[int, int]
    rel_output_error: float
    valid_row_fraction: float
    stack: str = ""
    block: int = -1
    rel_error_fp: float | None = None
    rel_error_fp_uncorrected: float | None = None
    propagated_error: float | None = None
    alpha: float | None = None
    rho: float | None = None
    vulnerability: float | None = None


@dataclass
class QuantizationReport:
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    n_calib: int = 0

    def summary(self) -> str:
        errors = [layer.rel_output_error for layer in self.layers]
        mean = sum(errors) / max(len(errors), 1)
        lines = [f"quantized {len(self.layers)} linear layers with {self.config['method']} "
                 f"{self.config['bits']}-bit g{self.config['group_size']} on {self.n_calib} utterances "
                 f"in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB",
                 f"relative output error: mean {mean:.4f}, max {max(errors, default=0):.4f}"]
        fp_errors = [layer.rel_error_fp for layer in self.layers if layer.rel_error_fp is not None]
        if fp_errors:
            lines.append(f"error against the full-precision output: mean {sum(fp_errors) / len(fp_errors):.4f}, "
                         f"last layer {fp_errors[-1]:.4f}")
        alphas = [layer.alpha for layer in self.layers if layer.alpha is not None]
        if alphas:
            lines.append(f"alpha: mean {sum(alphas) / len(alphas):.3f}, min {min(alphas):.3f}, max {max(alphas):.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (config, seconds, peak_rss_mb, n_calib, layers as dicts)."""
        return {"config": self.config, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "n_calib": self.n_calib, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationReport":
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])]
        return cls(config=data["config"], layers=layers, seconds=data.get("seconds", 0.0),
                   peak_rss_mb=data.get("peak_rss_mb", 0.0), n_calib=data.get("n_calib", 0))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


def _base_solve(stacked: torch.Tensor, stats: GramStats, act_mean_abs: torch.Tensor | None, config: QuantConfig,
                allow_input_scale: bool = True):
    """Quantize the stacked weight float32 (N, K) with the config's base solver.

    allow_input_scale: False where the group's input cannot be rescaled (AWQ then falls back to
    its plain solver). Returns (codes, scales, zeros, input_scale or None)."""
    solver = config.base_solver
    if solver.startswith("awq") and (not allow_input_scale or act_mean_abs is None):
        solver = "gptq" if config.method == "awq-gptq" else "rtn"
    if solver == "rtn":
        codes, scales, zeros = rtn_quantize(stacked, config.bits, config.group_size, config.sym)
        return codes, scales, zeros, None
    if solver == "gptq":
        result = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                               act_order=config.act_order, block_size=config.block_size, damp=config.damp)
        return result.codes, result.scales, result.zeros, None
    from fade_kernels.solver.awq import awq_quantize

    then = "gptq" if config.method == "awq-gptq" else "rtn"
    kwargs = dict(act_order=config.act_order, block_size=config.block_size, damp=config.damp) if then == "gptq" else {}
    codes, scales, zeros, input_scale, _ = awq_quantize(
        stacked, stats.hessian, act_mean_abs, config.bits, config.group_size, config.sym, n_grid=config.awq_grid,
        solver=then, **kwargs)
    return codes, scales, zeros, input_scale


def _local_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row tr(dW H dW^T), float64 (N,)."""
    delta = weight.float() - weight_hat
    return ((delta @ hessian) * delta).sum(dim=1).double()


def solve_linear_group(weights: list[torch.Tensor], stats: GramStats | torch.Tensor, config: QuantConfig,
                       half_stats: tuple[GramStats, GramStats] | None = None, act_mean_abs: torch.Tensor | None = None,
                       excluded: list[bool] | None = None, allow_input_scale: bool = True) -> list[LayerSolution]:
    """Quantize linears sharing one input.

    weights: float (N_i, K) each, the full-precision weights. stats: the group's GramStats (or a
    float32 (K, K) Hessian for the plain methods). half_stats: FADE's cross-fitting halves.
    act_mean_abs: float32 (K,) mean |x| per input channel (AWQ). excluded: per layer, True when
    QEP must leave it uncorrected (alpha = 0). allow_input_scale: whether AWQ may rescale the
    group's input. Returns one LayerSolution per layer.
    """
    if isinstance(stats, torch.Tensor):
        stats = GramStats(stats, None, None, 0)
    sizes = [w.shape[0] for w in weights]
    stacked = torch.cat([w.detach().float() for w in weights], 0)
    layer_alphas, rhos, vulns = [None] * len(weights), [None] * len(weights), [None] * len(weights)
    uncorrected = None
    if config.propagates:
        if stats.cross is None:
            raise ValueError(f"method {config.method!r} needs the full-precision chain's statistics (G, D)")
        correction = qep_correction(stacked, stats.hessian, stats.cross, config.qep_damp)
        excluded = excluded or [False] * len(weights)
        if config.method.startswith("qep"):
            layer_alphas = [0.0 if skip else config.alpha for skip in excluded]
        else:
            layer_alphas, rhos, vulns, uncorrected = _fade_alphas(stacked, sizes, correction, stats, half_stats, config)
        row_alpha = torch.cat([torch.full((n,), a) for n, a in zip(sizes, layer_alphas)])
        target = corrected_weight(stacked, correction, row_alpha)
    else:
        target = stacked
    codes, scales, zeros, input_scale = _base_solve(target, stats, act_mean_abs, config, allow_input_scale)
    uncorrected = uncorrected.split(sizes) if uncorrected is not None else [None] * len(sizes)
    out = []
    for index, (c, sc, z, t) in enumerate(zip(codes.split(sizes), scales.split(sizes), zeros.split(sizes),
                                              target.split(sizes))):
        out.append(LayerSolution(c, sc, z, input_scale, layer_alphas[index], rhos[index], vulns[index], t,
                                 uncorrected[index]))
    return out


def _fade_alphas(stacked, sizes, correction, stats: GramStats, half_stats, config: QuantConfig):
    """FADE's per-layer alpha (background §6) for the layers stacked in `stacked` (N, K).

    Returns (alphas, rhos, vulnerabilities) per layer and the dequantized alpha = 0 solution (N, K)."""
    if half_stats is None:
        raise ValueError("FADE needs the statistics of both calibration halves")
    half_a, half_b = half_stats
    cross_fitted = cross_fitted_coefficients(stacked, half_a, half_b, config.qep_damp)
    in_sample = residual_coefficients(stacked, correction, stats)
    noise = grid_noise_curve(stacked, correction, stats.hessian, config.bits, config.group_size, config.sym)
    width = stacked.shape[1]
    rtn0 = _dequantized(*rtn_quantize(stacked, config.bits, config.group_size, config.sym), width)
    uncorrected = rtn0
    if config.base_solver == "gptq":
        # GPTQ removes part of the grid noise; measure how much once, at alpha = 0, per layer.
        gptq0 = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                              act_order=config.act_order, block_size=config.block_size, damp=config.damp)
        uncorrected = _dequantized(gptq0.codes, gptq0.scales, gptq0.zeros, width)
        err_gptq = _local_error(stacked, uncorrected, stats.hessian)
        err_rtn = _local_error(stacked, rtn0, stats.hessian)
    alphas, rhos, vulns = [], [], []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        kappa = 1.0
        if config.base_solver == "gptq":
            kappa = float(err_gptq[rows].sum() / err_rtn[rows].sum().clamp(min=1e-30))
        choice = choose_alpha(cross_fitted[:, rows].sum(dim=1), in_sample[:, rows].sum(dim=1),
                              noise[:, rows].sum(dim=1), kappa, config.fade_rule)
        alphas.append(choice.alpha)
        rhos.append(choice.rho)
        vulns.append(choice.vulnerability)
    return alphas, rhos, vulns, uncorrected


def _dequantized(codes, scales, zeros, width: int) -> torch.Tensor:
    group = width // scales.shape[1]
    return (codes.float() - expand_groups(zeros.float(), group)) * expand_groups(scales, group)


def _relative_output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = weight.float() - weight_hat
    num = torch.einsum("nk,kl,nl->", delta, hessian, delta)
    den = torch.einsum("nk,kl,nl->", weight.float(), hessian, weight.float())
    return float((num / den.clamp(min=1e-30)).clamp(min=0).sqrt())


class _StackQuantizer:
    """Runs steps 2-3 of the lifecycle over one stack's blocks, on one or two chains."""

    def __init__(self, config: QuantConfig, report: QuantizationReport, solved: dict, progress: bool,
                 track_fp: bool):
        self.config, self.report, self.solved, self.progress = config, report, solved, progress
        self.track_fp = track_fp
        self.n_halves = 2 if config.method.startswith("fade") else 1

    def run(self, stack_name: str, layers: nn.ModuleList, layer_prefix: str, groups, calls: list[dict],
            masks: list[dict], halves: list[torch.Tensor], fp_calls: list[dict] | None = None):
        """calls / fp_calls: per batch, the first block's call kwargs on the quantized / full-precision
        chain; masks: per batch {own, encoder} bool (B, T); halves: per batch int64 (B,) cross-fitting
        half of each utterance. Returns the last block's outputs per batch for both chains
        (the second list is None without the full-precision chain)."""
        bar = tqdm(total=len(layers) * len(groups), desc=f"{stack_name} blocks", unit="group", disable=not self.progress)
        for index, block in enumerate(layers):
            bar.set_postfix_str(f"block {index + 1}/{len(layers)}")
            fp_rows = None
            if fp_calls is not None:
                # The full-precision twin of this block, run once: its groups' inputs (valid rows
                # only) for G and D, and its output as the next block's full-precision input.
                fp_rows = self._run_fp_twin(copy.deepcopy(block), groups, fp_calls, masks)
            for group_index, group in enumerate(groups):
                self._solve_group(block, f"{layer_prefix}.{index}", group, calls, masks, halves,
                                  None if fp_rows is None else fp_rows[group_index], stack_name, index)
                bar.update(1)
            for call in calls:
                call["hidden_states"] = run_block(block, call)
        bar.close()
        fp_out = None if fp_calls is None else [call["hidden_states"] for call in fp_calls]
        return [call["hidden_states"] for call in calls], fp_out

    @staticmethod
    def _run_fp_twin(fp_block: nn.Module, groups, fp_calls: list[dict], masks: list[dict]) -> list[list[torch.Tensor]]:
        rows = [[] for _ in groups]
        current = {}

        def make_hook(group_index, mask_key):
            def hook(module, args):
                x = args[0].detach()
                mask = current[mask_key]
                rows[group_index].append(x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float())
            return hook

        handles = [fp_block.get_submodule(group.names[0]).register_forward_pre_hook(make_hook(i, group.mask))
                   for i, group in enumerate(groups)]
        try:
            for call, mask in zip(fp_calls, masks):
                current.update(mask)
                call["hidden_states"] = run_block(fp_block, call)
        finally:
            for handle in handles:
                handle.remove()
        return rows

    def _collect_stats(self, block, group, calls, masks, halves, fp_rows) -> GramAccumulator:
        module = block.get_submodule(group.names[0])
        accumulator = GramAccumulator(module.in_features, with_error=fp_rows is not None, n_halves=self.n_halves)
        current = {}

        def hook(module, args):
            x = args[0].detach()
            mask = current["mask"]
            x_hat = x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float()
            delta = None if fp_rows is None else fp_rows[current["batch"]] - x_hat
            half = None
            if self.n_halves == 2:
                half = current["halves"][:, None].expand(mask.shape)[mask]
            accumulator.add(x_hat, delta, half, total_rows=mask.numel())
            # Nothing after this group's input matters for its statistics: stop the block here.
            raise StopForward

        handle = module.register_forward_pre_hook(hook)
        try:
            for batch, (call, mask) in enumerate(zip(calls, masks)):
                current.update(mask=mask[group.mask], batch=batch, halves=halves[batch])
                try:
                    run_block(block, call)
                except StopForward:
                    pass
        finally:
            handle.remove()
        return accumulator

    def _solve_group(self, block, block_name, group, calls, masks, halves, fp_rows, stack_name, block_index):
        modules = [block.get_submodule(name) for name in group.names]
        width = modules[0].in_features
        accumulator = self._collect_stats(block, group, calls, masks, halves, fp_rows)
        stats = accumulator.stats()
        half_stats = (accumulator.half_stats(0), accumulator.half_stats(1)) if self.n_halves == 2 else None
        excluded = [group.role in self.config.qep_exclude or name in self.config.qep_exclude
                    or name.rsplit(".", 1)[-1] in self.config.qep_exclude for name in group.names]
        solutions = solve_linear_group([m.weight for m in modules], stats, self.config, half_stats,
                                       accumulator.act_mean_abs, excluded, self._can_rescale(block, group, width))
        input_scale = solutions[0].input_scale
        for name, module, solution in zip(group.names, modules, solutions):
            weight_hat = _dequantized(solution.codes, solution.scales, solution.zeros, width)
            if input_scale is not None:
                # The codes represent W diag(s); the model now computes with that weight on x / s.
                effective = weight_hat / input_scale[None, :]
            else:
                effective = weight_hat
            full_name = f"{block_name}.{name}"
            layer_report = LayerReport(
                full_name, tuple(module.weight.shape),
                _relative_output_error(solution.target, effective, stats.hessian),
                accumulator.valid_fraction, stack=stack_name, block=block_index, alpha=solution.alpha,
                rho=solution.rho, vulnerability=solution.vulnerability)
            if stats.cross is not None:
                fp_error, propagated = output_error_vs_full_precision(module.weight.detach(), effective, stats)
                layer_report.rel_error_fp, layer_report.propagated_error = fp_error, propagated
                if not solution.alpha:
                    layer_report.rel_error_fp_uncorrected = fp_error
                elif solution.uncorrected is not None:
                    layer_report.rel_error_fp_uncorrected = output_error_vs_full_precision(
                        module.weight.detach(), solution.uncorrected, stats)[0]
            self.report.layers.append(layer_report)
            # The live block now computes with the quantized weight, so later groups and
            # blocks see the quantized upstream (the quantized chain).
            module.weight.data.copy_(weight_hat.to(module.weight.dtype))
            self.solved[full_name] = [solution.codes, solution.scales, solution.zeros]
        if input_scale is not None:
            self._fold_input_scale(block, block_name, group, input_scale)

    @staticmethod
    def _can_rescale(block, group, width: int) -> bool:
        """Whether the group's input can be divided by AWQ's scales exactly (see LinearGroup.scale_into)."""
        if group.scale_into is None:
            return False
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            return source.weight is not None
        # v_proj rows map one to one onto out_proj inputs only without grouped-query attention.
        return isinstance(source, nn.Linear) and source.out_features == width

    def _fold_input_scale(self, block, block_name, group, input_scale):
        """Divide the group's input by s where that is exact (background: AWQ scales are folded)."""
        if group.scale_into is None:
            raise RuntimeError(f"AWQ produced input scales for {group.names} whose input cannot be rescaled")
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            source.weight.data.div_(input_scale.to(source.weight.dtype))
            if source.bias is not None:
                source.bias.data.div_(input_scale.to(source.bias.dtype))
            return
        # An already-quantized v_proj: its output rows are this group's input channels. Scaling a
        # row scales that row's group scales and keeps the codes; the new scales are rounded to
        # float16 as the checkpoint stores them, and the live weight follows the rounded ones.
        entry = self.solved[f"{block_name}.{group.scale_into}"]
        entry[1] = (entry[1] / input_scale[:, None]).half().float()
        source.weight.data.copy_(_dequantized(entry[0], entry[1], entry[2], source.in_features).to(source.weight.dtype))
        if source.bias is not None:
            source.bias.data.div_(input_scale.to(source.bias.dtype))


def _batches(samples: list[CalibSample], batch_size: int):
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[CalibSample], config: QuantConfig, batch_size: int = 8,
                   adapter: ModelAdapter | None = None, progress: bool = True,
                   track_fp_error: bool | None = None) -> QuantizationReport:
    """Quantize every encoder and decoder linear layer of `model` in place.

    model: a transformers encoder-decoder ASR model (Whisper, Moonshine) in float32.
    samples: calibration utterances (see calib.prepare_samples); RTN still runs the pipeline
    so the report carries output errors. Returns a QuantizationReport; afterwards every
    solved nn.Linear is a QuantLinear and `model.config.quantization_config` describes them.
    track_fp_error: also run the full-precision chain to report each layer's error against the
    full-precision output (default: only for QEP/FADE, which need that chain anyway; it costs one
    extra forward of each block). FADE's cross-fitting halves are the even and odd positions of
    `samples` (a random subset already, so the split is fixed by the subset's seed).
    """
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one utterance")
    if config.method.startswith("fade") and len(samples) < 2:
        raise ValueError(f"method {config.method!r} needs at least 2 calibration utterances (one per cross-fitting half), "
                         f"got {len(samples)}")
    two_chain = config.propagates if track_fp_error is None else (track_fp_error or config.propagates)
    adapter = adapter or get_adapter(model)
    model.eval()
    start = time.perf_counter()
    report = QuantizationReport(config=config.to_dict(), n_calib=len(samples))
    solved: dict[str, tuple] = {}
    stack = _StackQuantizer(config, report, solved, progress, two_chain)
    encoder, decoder = adapter.encoder(model), adapter.decoder(model)
    names = {module: name for name, module in model.named_modules()}
    batches = _batches(samples, batch_size)
    halves = [torch.arange(i, i + len(batch)) % 2 for i, batch in zip(range(0, len(samples), batch_size), batches)]

    # Encoder: capture block-0 inputs; the mask keeps the frames that carry real audio.
    enc_layers = adapter.encoder_layers(model)
    enc_calls, enc_masks, enc_inputs = [], [], []
    for batch in batches:
        inputs = adapter.collate_encoder_inputs(batch)
        enc_inputs.append(inputs)
        call = capture_block_inputs(enc_layers[0], lambda: encoder(**inputs))
        n_frames = call["hidden_states"].shape[1]
        valid = torch.zeros(len(batch), n_frames, dtype=torch.bool)
        for row, sample in enumerate(batch):
            valid[row, : adapter.encoder_valid_frames(model, sample.n_samples, n_frames)] = True
        enc_calls.append(call)
        enc_masks.append({OWN_TOKENS: valid})
    # Both chains start from the same (full-precision) stem output.
    enc_fp_calls = [dict(call) for call in enc_calls] if two_chain else None
    hidden, fp_hidden = stack.run("encoder", enc_layers, names[enc_layers], adapter.encoder_groups, enc_calls,
                                  enc_masks, halves, enc_fp_calls)
    final_norm = adapter.encoder_final_norm(model)
    encoder_outputs = [final_norm(h) for h in hidden]
    fp_encoder_outputs = [final_norm(h) for h in fp_hidden] if two_chain else None

    # Decoder: teacher-forced on the transcript tokens, cross-attention on the quantized encoder.
    dec_layers = adapter.decoder_layers(model)
    dec_calls, dec_masks, dec_fp_calls = [], [], []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    for index, (batch, enc_out, enc_mask, inputs) in enumerate(zip(batches, encoder_outputs, enc_masks, enc_inputs)):
        longest = max(len(s.decoder_ids) for s in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        own = torch.zeros(len(batch), longest, dtype=torch.bool)
        for row, sample in enumerate(batch):
            ids[row, : len(sample.decoder_ids)] = sample.decoder_ids
            own[row, : len(sample.decoder_ids)] = True
        # Right padding under a causal mask cannot affect the real positions, so no decoder
        # attention mask is needed; padded rows are only dropped from the statistics.
        kwargs = adapter.decoder_call_kwargs(inputs, enc_mask[OWN_TOKENS])
        call = capture_block_inputs(dec_layers[0], lambda: decoder(input_ids=ids, encoder_hidden_states=enc_out,
                                                                    use_cache=False, **kwargs))
        dec_calls.append(call)
        dec_masks.append({OWN_TOKENS: own, ENCODER_FRAMES: enc_mask[OWN_TOKENS]})
        if two_chain:
            # Same tokens; cross-attention reads the full-precision encoder's output.
            dec_fp_calls.append({**call, "encoder_hidden_states": fp_encoder_outputs[index]})
    stack.run("decoder", dec_layers, names[dec_layers], adapter.decoder_groups, dec_calls, dec_masks, halves,
              dec_fp_calls if two_chain else None)

    linears = dict(model.named_modules())
    replace_linears(model, list(solved), lambda name, linear: QuantLinear.from_codes(
        *solved[name], bits=config.bits, group_size=config.group_size,
        bias=None if linear.bias is None else linear.bias.detach(), sym=config.sym))
    del linears
    model.config.quantization_config = quantization_config_dict(config, list(solved))
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = _peak_rss_mb()
    return report


def quantization_config_dict(config: QuantConfig, module_names: list[str]) -> dict:
    """The `quantization_config` stored in config.json for a fade-kernels checkpoint."""
    return {
        "quant_method": "fade", "checkpoint_format": "fade", "method": config.method,
        "bits": config.bits, "group_size": config.group_size, "sym": config.sym, "desc_act": config.act_order,
        "modules": {name: {"bits": config.bits, "group_size": config.group_size, "sym": config.sym}
                    for name in module_names},
    }
