"""One adapter per encoder-decoder family, behind one protocol.

An adapter tells the calibration pipeline where the encoder and decoder blocks are, which
linear layers of a block form the true-sequential groups (docs/methods.md §7), which token mask
each group's input follows, how to run the stack up to its first block, and how many encoder
frames of an utterance are real audio rather than padding. Conv stems, embeddings and the
tied output projection are never listed, so they stay in full precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fade_kernels.models.prompt import transcription_prompt

# Which mask applies to a group's input rows: the stack's own tokens, or the encoder frames
# (decoder cross-attention keys/values read the encoder output).
OWN_TOKENS = "own"
ENCODER_FRAMES = "encoder"


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers (names relative to the block) that read one input, solved together.

    role: what the group is in the block ("attn_qkv", "attn_out", "cross_q", "cross_kv",
    "cross_out", "mlp_in", "mlp_out"); QEP's default exclusion names the role "mlp_out".
    scale_into: where AWQ's input-channel scale 1/s can be folded exactly, relative to the block:
    a LayerNorm feeding only this group (its weight and bias are divided), or the attention's
    v_proj whose output rows are this group's input channels (its rows are divided). None: the
    input comes through a nonlinearity or is shared with other blocks, so AWQ leaves it unscaled.
    """

    names: tuple[str, ...]
    mask: str = OWN_TOKENS
    role: str = ""
    scale_into: str | None = None


class ModelAdapter:
    """Protocol every family implements. Subclasses fill the class attributes and methods."""

    family: str = ""
    encoder_groups: tuple[LinearGroup, ...] = ()
    decoder_groups: tuple[LinearGroup, ...] = ()

    def encoder(self, model: nn.Module) -> nn.Module:
        return model.get_encoder()

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.encoder(model).layers

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def encoder_final_norm(self, model: nn.Module) -> nn.Module:
        return self.encoder(model).layer_norm

    def encoder_input_name(self) -> str:
        raise NotImplementedError

    def encoder_valid_frames(self, model: nn.Module, n_samples: int, n_frames: int) -> int:
        """Encoder output frames that carry real audio for an utterance of n_samples at 16 kHz."""
        raise NotImplementedError

    def decoder_prompt(self, model: nn.Module, tokenizer) -> list[int]:
        """Token ids that start every decoder sequence (before the transcript)."""
        raise NotImplementedError

    def collate_encoder_inputs(self, samples) -> dict:
        """Keyword arguments for the encoder from a list of CalibSample."""
        raise NotImplementedError

    def transcript_ids(self, tokenizer, text: str) -> list[int]:
        """Token ids of a reference transcript, without special tokens."""
        raise NotImplementedError

    def decoder_call_kwargs(self, encoder_inputs: dict, encoder_frame_mask: torch.Tensor) -> dict:
        """Extra decoder keyword arguments during calibration (e.g. the encoder padding mask)."""
        return {}

    def quantizable_names(self, model: nn.Module) -> list[str]:
        """Full module names of every linear layer the pipeline quantizes, in pipeline order."""
        names = []
        for stack, layers, groups in (("encoder", self.encoder_layers(model), self.encoder_groups),
                                      ("decoder", self.decoder_layers(model), self.decoder_groups)):
            prefix = _module_name(model, layers)
            for index in range(len(layers)):
                names += [f"{prefix}.{index}.{name}" for group in groups for name in group.names]
        return names


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")


def block_groups(out: str, fc1: str, fc2: str, attn_norm: str, mlp_norm: str,
                 cross_norm: str | None = None) -> tuple[LinearGroup, ...]:
    """The linear groups of one pre-norm transformer block, in execution order, from the family's
    module names: self-attention q/k/v (one group: one input) and its output projection
    `self_attn.<out>`, then, when `cross_norm` is given (a decoder block), cross-attention q,
    k/v (fed by encoder frames) and `encoder_attn.<out>`, then the MLP `fc1`, `fc2`. Each
    group's scale_into is the module producing its input: the preceding norm, or v_proj for an
    attention output (attention mixes v's rows, so a per-channel scale of v's output passes
    through)."""
    groups = [
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), role="attn_qkv",
                    scale_into=attn_norm),
        LinearGroup((f"self_attn.{out}",), role="attn_out", scale_into="self_attn.v_proj"),
    ]
    if cross_norm is not None:
        groups += [
            LinearGroup(("encoder_attn.q_proj",), role="cross_q", scale_into=cross_norm),
            LinearGroup(("encoder_attn.k_proj", "encoder_attn.v_proj"), mask=ENCODER_FRAMES, role="cross_kv"),
            LinearGroup((f"encoder_attn.{out}",), role="cross_out", scale_into="encoder_attn.v_proj"),
        ]
    return (*groups, LinearGroup((fc1,), role="mlp_in", scale_into=mlp_norm), LinearGroup((fc2,), role="mlp_out"))


class WhisperAdapter(ModelAdapter):
    family = "whisper"
    encoder_groups = block_groups("out_proj", "fc1", "fc2", attn_norm="self_attn_layer_norm",
                                  mlp_norm="final_layer_norm")
    decoder_groups = block_groups("out_proj", "fc1", "fc2", attn_norm="self_attn_layer_norm",
                                  mlp_norm="final_layer_norm", cross_norm="encoder_attn_layer_norm")

    def encoder_input_name(self) -> str:
        return "input_features"

    def encoder_valid_frames(self, model, n_samples, n_frames):
        # 10 ms mel hop (160 samples, centred STFT adds one frame), then conv2 with stride 2.
        mel_frames = n_samples // 160 + 1
        return max(1, min(n_frames, math.ceil(mel_frames / 2)))

    def decoder_prompt(self, model, tokenizer):
        return transcription_prompt(model)

    def collate_encoder_inputs(self, samples):
        # Every Whisper input is already padded to 30 s of log-mel frames (80|128, 3000).
        return {"input_features": torch.stack([s.encoder_input for s in samples])}

    def transcript_ids(self, tokenizer, text):
        # Whisper transcripts start with a space token, as the model itself emits them.
        return tokenizer(" " + text.strip(), add_special_tokens=False).input_ids


class MoonshineAdapter(ModelAdapter):
    family = "moonshine"
    encoder_groups = block_groups("o_proj", "mlp.fc1", "mlp.fc2", attn_norm="input_layernorm",
                                  mlp_norm="post_attention_layernorm")
    decoder_groups = block_groups("o_proj", "mlp.fc1", "mlp.fc2", attn_norm="input_layernorm",
                                  mlp_norm="final_layernorm", cross_norm="post_attention_layernorm")

    def encoder_input_name(self) -> str:
        return "input_values"

    def encoder_valid_frames(self, model, n_samples, n_frames):
        length = self.encoder(model)._get_feat_extract_output_lengths(torch.tensor(n_samples))
        return max(1, min(n_frames, int(length)))

    def decoder_prompt(self, model, tokenizer):
        return [model.config.decoder_start_token_id]

    def collate_encoder_inputs(self, samples):
        # Raw audio of different lengths: right-pad with zeros and mark the real samples.
        longest = max(s.encoder_input.shape[0] for s in samples)
        values = torch.zeros(len(samples), longest)
        mask = torch.zeros(len(samples), longest, dtype=torch.long)
        for row, sample in enumerate(samples):
            values[row, : sample.encoder_input.shape[0]] = sample.encoder_input
            mask[row, : sample.encoder_input.shape[0]] = 1
        return {"input_values": values, "attention_mask": mask}

    def transcript_ids(self, tokenizer, text):
        return tokenizer(text.strip(), add_special_tokens=False).input_ids

    def decoder_call_kwargs(self, encoder_inputs, encoder_frame_mask):
        # Moonshine's encoder output has no padding of its own: cross-attention must skip the
        # frames that came from zero-padded audio, exactly as generate() does.
        return {"encoder_attention_mask": encoder_frame_mask.long()}


ADAPTERS = {"whisper": WhisperAdapter, "moonshine": MoonshineAdapter}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model` by its config's model_type; clear error for unsupported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]()

