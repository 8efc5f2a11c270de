"""The pipeline's side of a resumable run: what is saved after each block and put back on restart.

The files themselves (fingerprint, state, atomic writes) are pipeline/resume_state.py's ResumeState.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from fade_kernels.pipeline.resume_state import ResumeMismatchError, ResumeState, SavedState
from fade_kernels.config import QuantConfig
from fade_kernels.memory.cache import ActivationCache
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.pipeline.report import LayerReport, QuantizationReport
from fade_kernels.timing import stage


def restore_block(block: nn.Module, tensors: dict[str, torch.Tensor], names: list[str], config: QuantConfig,
                  bits: dict[str, int] | None = None) -> None:
    """Put a finished block back as a resumed run saved it: empty QuantLinear at `names`, then
    every tensor of the block's saved state_dict (strict, assigned without a copy).
    bits: {name in the block: width} of a mixed-precision plan (default config.bits)."""
    bits = bits or {}
    replace_linears(block, names, lambda name, linear: QuantLinear(
        linear.in_features, linear.out_features, bits.get(name, config.bits), config.group_size,
        bias=linear.bias is not None, sym=config.sym))
    block.load_state_dict(tensors, strict=True, assign=True)


def restore_finished_blocks(resume: ResumeState, saved: SavedState, report: QuantizationReport, stacks: dict,
                            config: QuantConfig, layer_bits: dict[str, int] | None = None) -> dict[str, list[list[str]]]:
    """Restore every block a resumed run had finished, and its report layers.

    stacks: {"encoder": (module name, layers), "decoder": (module name, layers)} (nn.ModuleList
    each). layer_bits: {full name: bits} of a mixed-precision plan. Returns the quantized layer
    names per finished block and stack."""
    layer_bits = layer_bits or {}
    report.layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in saved.layers]
    quantized = {stack: [list(block) for block in saved.quantized.get(stack, [])] for stack in stacks}
    with stage("checkpoint"):
        for stack_name, (prefix, layers) in stacks.items():
            for index, block_names in enumerate(quantized[stack_name]):
                bits = {name: layer_bits[f"{prefix}.{index}.{name}"] for name in block_names
                        if f"{prefix}.{index}.{name}" in layer_bits}
                restore_block(layers[index], resume.block_tensors(stack_name, index), block_names, config, bits)
    report.resumed_blocks = sum(len(blocks) for blocks in quantized.values())
    return quantized


class BlockCommitter:
    """on_block_done for StackQuantizer: records each finished block's layer names and, with a
    resume folder, writes the block, its outputs on both chains and the state atomically."""

    def __init__(self, resume: ResumeState | None, report: QuantizationReport, quantized: dict[str, list],
                 encoder_outputs_file: str | None):
        self.resume, self.report, self.quantized = resume, report, quantized
        self.encoder_outputs_file = encoder_outputs_file

    def __call__(self, stack_name, index, block, block_names, calls, fp_calls) -> None:
        self.quantized[stack_name].append(block_names)
        if self.resume is None:
            return
        with stage("checkpoint"):
            state = SavedState(stack_name, index + 1, [asdict(layer) for layer in self.report.layers], self.quantized,
                               None, self.encoder_outputs_file if stack_name == "decoder" else None)
            self.resume.commit_block(stack_name, index, block.state_dict(), [c["hidden_states"] for c in calls],
                                     None if fp_calls is None else [c["hidden_states"] for c in fp_calls], state)


def replace_hidden_states(resume: ResumeState, activations: str, cache: ActivationCache, calls: list[dict],
                          fp_calls: list[dict] | None) -> None:
    """A resumed run: the saved outputs of the last finished block become both chains' inputs."""
    q, fp = resume.read_chains(activations, cache.put)
    if len(q) != len(calls) or (fp_calls is not None and (fp is None or len(fp) != len(fp_calls))):
        raise ResumeMismatchError(f"{resume.dir / activations} does not hold one tensor per batch and chain")
    for chain_calls, entries in ((calls, q), (fp_calls or [], fp or [])):
        for call, entry in zip(chain_calls, entries):
            cache.release(call["hidden_states"])
            call["hidden_states"] = entry
