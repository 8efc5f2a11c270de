"""A low-bit output projection solved on calibration statistics (GPTQ) instead of rounded.

The tied output projection W float (V, D) turns the decoder's final hidden state h (D,), after
its last layer norm, into logits W h. Round to nearest minimises each weight's own error; what
decoding reads is the logit error, whose mean square over the calibration tokens is

    E ||(W - Q) h||^2 = tr((W - Q) H (W - Q)^T),    H = E[h h^T]   (float32 (D, D)).

That is GPTQ's objective for a layer whose input Gram is H, so the head is solved by the same
column sweep as every other layer (solver/gptq.py), with its grids chosen by the Hessian-weighted
clipping search. H is measured on the quantized model (after the pipeline), teacher-forced on the
calibration transcripts, over real tokens only: the inputs the head will see, error of the
layers below included, as each GPTQ layer is solved on its quantized chain's inputs.

The matrix is also the token embedding (nn/head.py keeps one copy): the embedding reads the same
rows, so its rows carry the sweep's error too; the choice between the two solvers is measured by
WER, where both uses are counted.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.samples import CalibSample
from fade_kernels.calib.statistics import accumulate_symmetric_gram, mirror_block_upper
from fade_kernels.config import QuantConfig
from fade_kernels.models.adapters import ModelAdapter
from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.pipeline.inputs import calibration_batches, encoder_frame_mask, teacher_forced_ids


@torch.no_grad()
def head_input_gram(model: nn.Module, samples: list[CalibSample], adapter: ModelAdapter, batch_size: int = 8,
                    progress: bool = True) -> torch.Tensor:
    """H = mean of h h^T over the real tokens of `samples`, h the decoder's final hidden state
    (the output projection's input), teacher-forced on each sample's decoder_ids.

    Returns float32 (D, D). Padded encoder frames are masked as in calibration; right-padded
    token positions are dropped (a causal decoder cannot see them from real positions)."""
    encoder, decoder = adapter.encoder(model), adapter.decoder(model)
    gram, count = None, 0
    for batch in tqdm(calibration_batches(samples, batch_size), desc="head statistics", disable=not progress):
        inputs = adapter.collate_encoder_inputs(batch)
        encoded = encoder(**inputs).last_hidden_state
        frames = encoder_frame_mask(model, adapter, batch, encoded.shape[1])
        ids, own = teacher_forced_ids(model, batch)
        hidden = decoder(input_ids=ids, encoder_hidden_states=encoded, use_cache=False,
                         **adapter.decoder_call_kwargs(inputs, frames)).last_hidden_state
        rows = hidden[own].float()                                                   # (R, D)
        if gram is None:
            gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32)
        accumulate_symmetric_gram(gram, rows)
        count += rows.shape[0]
    return mirror_block_upper(gram) / max(count, 1)


def gptq_head(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, config: QuantConfig) -> QuantLinear:
    """The output projection weight float (V, D) quantized by GPTQ against hessian float32 (D, D)
    (damp from `config`, Hessian-weighted grids, no act-order: the CPU kernels need g_idx trivial).
    Returns a QuantLinear without bias on weight's device."""
    from fade_kernels.solver.gptq import gptq_quantize

    result = gptq_quantize(weight.detach().float(), hessian, bits=bits, group_size=group_size,
                           damp=config.damp, block_size=config.block_size, clip="hessian")
    return QuantLinear.from_codes(result.codes, result.scales, result.zeros, bits, group_size).to(weight.device)


def head_solver(model: nn.Module, samples: list[CalibSample], config: QuantConfig, adapter: ModelAdapter,
                batch_size: int = 8, progress: bool = True):
    """The `solve` argument of nn.head.apply_head_format for config.head_solver: None (round to
    nearest, or a head format without codes), or for "gptq" a function (weight, bits, group_size)
    -> QuantLinear that measures H on `model` as it is when called, then runs gptq_head."""
    if config.head_solver != "gptq" or not config.head.startswith("bits"):
        return None

    def solve(weight: torch.Tensor, bits: int, group_size: int) -> QuantLinear:
        hessian = head_input_gram(model, samples, adapter, batch_size, progress)
        return gptq_head(weight, hessian, bits, group_size, config)

    return solve
