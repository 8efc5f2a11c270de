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

import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.capture import HessianAccumulator, capture_block_inputs, hessian_hook, run_block
from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig
from fade_kernels.models.adapters import ENCODER_FRAMES, OWN_TOKENS, ModelAdapter, get_adapter
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.solver.gptq import gptq_quantize
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


def solve_linear_group(weights: list[torch.Tensor], hessian: torch.Tensor, config: QuantConfig):
    """Quantize linears sharing one input. weights: float (N_i, K) each; hessian: float32 (K, K).

    Returns [(codes int32 (N_i, K), scales float32 (N_i, G), zeros int32 (N_i, G))] per layer.
    """
    sizes = [w.shape[0] for w in weights]
    stacked = torch.cat([w.detach().float() for w in weights], 0)
    if config.method == "rtn":
        codes, scales, zeros = rtn_quantize(stacked, config.bits, config.group_size, config.sym)
    else:
        result = gptq_quantize(stacked, hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                               act_order=config.act_order, block_size=config.block_size, damp=config.damp)
        codes, scales, zeros = result.codes, result.scales, result.zeros
    return list(zip(codes.split(sizes), scales.split(sizes), zeros.split(sizes)))


def _dequantized(codes, scales, zeros, width: int) -> torch.Tensor:
    group = width // scales.shape[1]
    return (codes.float() - expand_groups(zeros.float(), group)) * expand_groups(scales, group)


def _relative_output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = weight.float() - weight_hat
    num = torch.einsum("nk,kl,nl->", delta, hessian, delta)
    den = torch.einsum("nk,kl,nl->", weight.float(), hessian, weight.float())
    return float((num / den.clamp(min=1e-30)).clamp(min=0).sqrt())


class _StackQuantizer:
    """Runs steps 2-3 of the lifecycle over one stack's blocks."""

    def __init__(self, config: QuantConfig, report: QuantizationReport, solved: dict, progress: bool):
        self.config, self.report, self.solved, self.progress = config, report, solved, progress

    def run(self, stack_name: str, layers: nn.ModuleList, layer_prefix: str, groups, calls: list[dict],
            masks: list[dict]) -> list[torch.Tensor]:
        """calls: per batch, the first block's call kwargs; masks: per batch {own, encoder} bool
        (B, T). Returns the last block's outputs per batch."""
        bar = tqdm(total=len(layers) * len(groups), desc=f"{stack_name} blocks", unit="group", disable=not self.progress)
        for index, block in enumerate(layers):
            bar.set_postfix_str(f"block {index + 1}/{len(layers)}")
            for group in groups:
                self._solve_group(block, f"{layer_prefix}.{index}", group, calls, masks)
                bar.update(1)
            for call in calls:
                call["hidden_states"] = run_block(block, call)
        bar.close()
        return [call["hidden_states"] for call in calls]

    def _solve_group(self, block, block_name, group, calls, masks):
        modules = [block.get_submodule(name) for name in group.names]
        width = modules[0].in_features
        accumulator = HessianAccumulator(width)
        mask_ref = {}
        handle = modules[0].register_forward_pre_hook(hessian_hook(accumulator, mask_ref, group.mask))
        try:
            for call, mask in zip(calls, masks):
                mask_ref.update(mask)
                run_block(block, call)
        finally:
            handle.remove()
        hessian = accumulator.hessian
        solutions = solve_linear_group([m.weight for m in modules], hessian, self.config)
        for name, module, (codes, scales, zeros) in zip(group.names, modules, solutions):
            weight_hat = _dequantized(codes, scales, zeros, width)
            full_name = f"{block_name}.{name}"
            self.report.layers.append(LayerReport(
                full_name, tuple(module.weight.shape), _relative_output_error(module.weight, weight_hat, hessian),
                accumulator.rows / max(accumulator.total_rows, 1)))
            # The live block now computes with the quantized weight, so later groups and
            # blocks see the quantized upstream (the quantized chain).
            module.weight.data.copy_(weight_hat.to(module.weight.dtype))
            self.solved[full_name] = (codes, scales, zeros)


def _batches(samples: list[CalibSample], batch_size: int):
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[CalibSample], config: QuantConfig, batch_size: int = 8,
                   adapter: ModelAdapter | None = None, progress: bool = True) -> QuantizationReport:
    """Quantize every encoder and decoder linear layer of `model` in place.

    model: a transformers encoder-decoder ASR model (Whisper, Moonshine) in float32.
    samples: calibration utterances (see calib.prepare_samples); RTN still runs the pipeline
    so the report carries output errors. Returns a QuantizationReport; afterwards every
    solved nn.Linear is a QuantLinear and `model.config.quantization_config` describes them.
    """
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one utterance")
    adapter = adapter or get_adapter(model)
    model.eval()
    start = time.perf_counter()
    report = QuantizationReport(config=config.to_dict(), n_calib=len(samples))
    solved: dict[str, tuple] = {}
    stack = _StackQuantizer(config, report, solved, progress)
    encoder, decoder = adapter.encoder(model), adapter.decoder(model)
    names = {module: name for name, module in model.named_modules()}
    batches = _batches(samples, batch_size)

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
    hidden = stack.run("encoder", enc_layers, names[enc_layers], adapter.encoder_groups, enc_calls, enc_masks)
    final_norm = adapter.encoder_final_norm(model)
    encoder_outputs = [final_norm(h) for h in hidden]

    # Decoder: teacher-forced on the transcript tokens, cross-attention on the quantized encoder.
    dec_layers = adapter.decoder_layers(model)
    dec_calls, dec_masks = [], []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    for batch, enc_out, enc_mask, inputs in zip(batches, encoder_outputs, enc_masks, enc_inputs):
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
    stack.run("decoder", dec_layers, names[dec_layers], adapter.decoder_groups, dec_calls, dec_masks)

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
