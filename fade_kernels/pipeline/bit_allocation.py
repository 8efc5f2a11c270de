"""Mixed precision under a bit budget: which linear groups get the next wider grid.

Storage. A QuantLinear with N outputs quantized at b bits in groups of g input columns stores,
per weight (`bits_per_weight`),
    b + (16 + b) / g + 32 / N
the codes, a float16 scale and a b-bit zero point per group (GPTQ's layout keeps the zero point
for symmetric grids too) and the int32 group index of each input column; g is the layer's input
width when there is one group per row. The bias is the same at any width and not counted. The
budget (QuantConfig.avg_bits) bounds the mean over every quantized weight of the model; the
output projection / token embedding (QuantConfig.head) is not part of it.

Sensitivity. Layers that read one input are solved together (one GPTQ sweep for q/k/v), so a
group shares one width. A group's score at width b is its relative output error under round to
nearest with a diagonal input Hessian:
    e_b = sum_l || (W_l - Q_b(W_l)) D^1/2 ||_F^2  /  sum_l || W_l D^1/2 ||_F^2,
D = diag(X^T X) / T, the mean squared value of each input column over the calibration rows of the
full-precision model (padded frames and tokens left out). The numerator is GPTQ's objective
tr(dW H dW^T) with H reduced to its diagonal; the denominator makes layers of different scales
comparable, i.e. each group's relative output error is assumed to cost the model the same.

Allocation. Moving a group from b to b' = wider_bits(b) lowers the summed score by e_b - e_b'
and costs n_weights * (bits_per_weight(b') - bits_per_weight(b)) bits. Groups are taken by
decreasing gain per bit, each one that still fits in the budget (a greedy knapsack). The control
rule "random" (QuantConfig.avg_bits_rule) takes them in a random order instead, same budget, to
measure what the sensitivity ranking is worth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig, wider_bits
from fade_kernels.models.adapters import ENCODER_FRAMES, ModelAdapter
from fade_kernels.solver.grid import dequantize_grouped
from fade_kernels.solver.rtn import rtn_quantize


def bits_per_weight(bits: int, group_size: int, in_features: int, out_features: int) -> float:
    """Stored bits per weight of a QuantLinear (out_features, in_features): codes, each group's
    float16 scale and `bits`-wide zero point, each input column's int32 group index."""
    columns = in_features if group_size == -1 else group_size
    return bits + (16 + bits) / columns + 32 / out_features


@dataclass
class GroupCandidate:
    """One linear group as the allocation sees it.

    names: full module names (solved together, one width); weights: float (N_i, K) each;
    input_power: float64 (K,), the mean squared input per column (D above)."""

    names: tuple[str, ...]
    weights: list[torch.Tensor]
    input_power: torch.Tensor

    @property
    def n_weights(self) -> int:
        return sum(w.numel() for w in self.weights)

    def stored_bits(self, bits: int, group_size: int) -> float:
        """The group's storage at `bits` (bits_per_weight of each layer times its weights)."""
        return sum(w.numel() * bits_per_weight(bits, group_size, w.shape[1], w.shape[0]) for w in self.weights)


def relative_rounding_error(candidate: GroupCandidate, bits: int, group_size: int, sym: bool) -> float:
    """e_b of the module docstring: the group's D-weighted round-to-nearest error over its
    D-weighted weight energy (float)."""
    d = candidate.input_power.double()
    error = energy = 0.0
    for weight in candidate.weights:
        w = weight.detach().float()
        w_hat = dequantize_grouped(*rtn_quantize(w, bits, group_size, sym))
        error += float(((w - w_hat).double().pow(2) * d).sum())
        energy += float((w.double().pow(2) * d).sum())
    return error / max(energy, 1e-30)


def allocate_bits(candidates: list[GroupCandidate], config: QuantConfig) -> dict[str, int]:
    """The width of every layer of `candidates` under config.avg_bits by config.avg_bits_rule
    (module docstring; "random" draws from torch's global generator).

    Returns {full name: bits} for every named layer (config.bits or wider_bits(config.bits)).
    Raises ValueError when avg_bits is below what config.bits alone stores."""
    base, wide = config.bits, wider_bits(config.bits)
    total = sum(c.n_weights for c in candidates)
    cost = {b: sum(c.stored_bits(b, config.group_size) for c in candidates) for b in (base, wide)}
    if cost[base] > config.avg_bits * total:
        raise ValueError(f"avg_bits {config.avg_bits} is below the {cost[base] / total:.4f} bits per weight that "
                         f"{base}-bit codes with their scales and zero points already take")
    slack = config.avg_bits * total - cost[base]
    extras = [candidate.stored_bits(wide, config.group_size) - candidate.stored_bits(base, config.group_size)
              for candidate in candidates]
    if config.avg_bits_rule == "random":   # the control needs no scores
        order = torch.randperm(len(candidates)).tolist()
    else:
        gain_per_bit = [(relative_rounding_error(candidate, base, config.group_size, config.sym)
                         - relative_rounding_error(candidate, wide, config.group_size, config.sym)) / extra
                        for candidate, extra in zip(candidates, extras)]
        order = sorted(range(len(candidates)), key=lambda i: -gain_per_bit[i])
    plan = {name: base for candidate in candidates for name in candidate.names}
    for i in order:
        extra, candidate = extras[i], candidates[i]
        if extra <= slack:
            slack -= extra
            plan.update({name: wide for name in candidate.names})
    return plan


def average_bits(model: nn.Module) -> float | None:
    """Mean stored bits per weight over `model`'s quantized linears, the output projection
    excluded: the bytes of their qweight, qzeros, scales and g_idx tensors over their weight
    count. None when nothing is quantized."""
    from fade_kernels.nn.quant_linear import QuantLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    stored = count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module is not head:
            stored += 8 * sum(t.numel() * t.element_size() for t in (module.qweight, module.qzeros, module.scales,
                                                                      module.g_idx))
            count += module.in_features * module.out_features
    return stored / count if count else None


@torch.no_grad()
def input_power(model: nn.Module, samples: list[CalibSample], adapter: ModelAdapter,
                targets: dict[str, tuple[str, str]], progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean squared input per column of each target linear over the calibration rows of
    `model` as it is (full precision before quantization).

    targets: {full module name: (stack "encoder"|"decoder", the group's mask: OWN_TOKENS or
    ENCODER_FRAMES)}. Rows kept: encoder frames that carry audio; every teacher-forced decoder
    token; for decoder layers fed by the encoder (cross-attention k/v) its frames with audio.
    Returns {name: float64 (K,)}. One utterance per forward, so no decoder padding exists."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)
    valid = {}

    def make_hook(name, stack, mask):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])     # batch of one: (T, K)
            if stack == "encoder" or mask == ENCODER_FRAMES:
                x = x[: valid["frames"]]
            x = x.double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] += x.shape[0]
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(make_hook(name, *where))
               for name, where in targets.items()]
    encoder, decoder = adapter.encoder(model), adapter.decoder(model)
    try:
        for sample in tqdm(samples, desc="bit allocation: input statistics", disable=not progress):
            inputs = adapter.collate_encoder_inputs([sample])
            # The hooks run inside the encoder, before its output length is known: take the
            # unclamped count of frames with audio (slicing clamps it to the rows there are).
            valid["frames"] = adapter.encoder_valid_frames(model, sample.n_samples, 1 << 30)
            hidden = encoder(**inputs)[0]
            mask = torch.zeros(1, hidden.shape[1], dtype=torch.bool)
            mask[0, : valid["frames"]] = True
            decoder(input_ids=sample.decoder_ids[None], encoder_hidden_states=hidden, use_cache=False,
                    **adapter.decoder_call_kwargs(inputs, mask))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(counts[name], 1) for name in targets}


def plan_bits(model: nn.Module, samples: list[CalibSample], config: QuantConfig, adapter: ModelAdapter,
              progress: bool = False) -> dict[str, int]:
    """{full name: bits} for every linear the pipeline quantizes (config.skips left out), chosen
    under config.avg_bits from the full-precision `model` and the calibration `samples`."""
    stacks = (("encoder", adapter.encoder_layers(model), adapter.encoder_groups),
              ("decoder", adapter.decoder_layers(model), adapter.decoder_groups))
    prefixes = {id(module): name for name, module in model.named_modules()}
    groups, targets = [], {}
    for stack, layers, block_groups in stacks:
        for index in range(len(layers)):
            for group in block_groups:
                names = tuple(f"{prefixes[id(layers)]}.{index}.{name}" for name in group.names)
                names = tuple(name for name in names if not config.skips(name))
                if names:
                    groups.append(names)
                    targets[names[0]] = (stack, group.mask)
    power = input_power(model, samples, adapter, targets, progress)
    candidates = [GroupCandidate(names, [model.get_submodule(name).weight for name in names], power[names[0]])
                  for names in groups]
    return allocate_bits(candidates, config)
