"""Input preparation: calibration batches, the first block's call of each stack, and the row masks.

Whisper pads every input to 30 s, and decoder batches are padded to their longest transcript:
the masks keep the rows that carry real audio frames or real tokens, so statistics are means
over those rows only.
"""
from __future__ import annotations

import torch
from torch import nn

from fade_kernels.calib.capture import capture_block_inputs
from fade_kernels.calib.samples import CalibSample
from fade_kernels.models.adapters import ENCODER_FRAMES, OWN_TOKENS, ModelAdapter
from fade_kernels.timing import stage


def calibration_batches(samples: list[CalibSample], batch_size: int) -> list[list[CalibSample]]:
    """`samples` in consecutive batches of at most batch_size."""
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def cross_fitting_halves(batches: list[list[CalibSample]]) -> list[torch.Tensor]:
    """Per batch, int64 (B,): FADE's cross-fitting half (0 or 1) of each sample: the parity of its
    source utterance (CalibSample.source; augmented copies share their clip's), or of its position
    in the whole sample list when it has none (the samples are a random subset already)."""
    halves, start = [], 0
    for batch in batches:
        halves.append(torch.tensor([(start + i if s.source is None else s.source) % 2 for i, s in enumerate(batch)],
                                   dtype=torch.int64))
        start += len(batch)
    return halves


def encoder_first_call(model: nn.Module, adapter: ModelAdapter, batch: list[CalibSample]) -> tuple[dict, dict, dict]:
    """The encoder's first block call for one batch.

    Returns (inputs: the collated encoder inputs, call: the first block's call kwargs with
    hidden_states float (B, T, D), masks: {OWN_TOKENS: bool (B, T), True on frames of real audio})."""
    encoder, first_block = adapter.encoder(model), adapter.encoder_layers(model)[0]
    inputs = adapter.collate_encoder_inputs(batch)
    with stage("capture"):
        call = capture_block_inputs(first_block, lambda: encoder(**inputs))
    return inputs, call, {OWN_TOKENS: encoder_frame_mask(model, adapter, batch, call["hidden_states"].shape[1])}


def encoder_frame_mask(model: nn.Module, adapter: ModelAdapter, batch: list[CalibSample], n_frames: int) -> torch.Tensor:
    """bool (B, n_frames): True on the encoder frames of each sample that carry real audio."""
    valid = torch.zeros(len(batch), n_frames, dtype=torch.bool)
    for row, sample in enumerate(batch):
        valid[row, : adapter.encoder_valid_frames(model, sample.n_samples, n_frames)] = True
    return valid


def teacher_forced_ids(model: nn.Module, batch: list[CalibSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's decoder_ids right-padded with the pad (else end-of-text) token: (ids int64 (B, L),
    own bool (B, L) True on real tokens), L the longest sequence."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    longest = max(len(s.decoder_ids) for s in batch)
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    own = torch.zeros(len(batch), longest, dtype=torch.bool)
    for row, sample in enumerate(batch):
        ids[row, : len(sample.decoder_ids)] = sample.decoder_ids
        own[row, : len(sample.decoder_ids)] = True
    return ids, own


def decoder_first_call(model: nn.Module, adapter: ModelAdapter, batch: list[CalibSample], inputs: dict,
                       encoder_output: torch.Tensor, encoder_mask: torch.Tensor) -> tuple[dict, dict]:
    """The decoder's first block call for one batch, teacher-forced on the samples' tokens.

    inputs: the batch's collated encoder inputs; encoder_output float (B, T_enc, D); encoder_mask
    bool (B, T_enc). Returns (call kwargs with hidden_states float (B, L, D), masks: {OWN_TOKENS:
    bool (B, L) on real tokens, ENCODER_FRAMES: encoder_mask})."""
    decoder, first_block = adapter.decoder(model), adapter.decoder_layers(model)[0]
    ids, own = teacher_forced_ids(model, batch)
    # Right padding under a causal mask cannot affect the real positions, so no decoder
    # attention mask is needed; padded rows are only dropped from the statistics.
    kwargs = adapter.decoder_call_kwargs(inputs, encoder_mask)
    with stage("capture"):
        call = capture_block_inputs(first_block, lambda: decoder(
            input_ids=ids, encoder_hidden_states=encoder_output, use_cache=False, **kwargs))
    return call, {OWN_TOKENS: own, ENCODER_FRAMES: encoder_mask}
