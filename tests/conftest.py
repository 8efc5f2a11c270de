"""Shared fixtures: tiny random Whisper and Moonshine models built from configs (no hub)."""
from __future__ import annotations

import os

# The Triton interpreter must be chosen before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def tiny_whisper_config(**overrides):
    from transformers import WhisperConfig

    # K = 64 and 128 keep every width a multiple of 32 (3-bit packing) and of group 32/64.
    settings = dict(vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                    max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1,
                    eos_token_id=2, pad_token_id=2, bos_token_id=2)
    settings.update(overrides)
    return WhisperConfig(**settings)


def tiny_moonshine_config(**overrides):
    from transformers import MoonshineConfig

    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, encoder_num_hidden_layers=2,
                    decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
                    decoder_start_token_id=1, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    settings.update(overrides)
    return MoonshineConfig(**settings)


@pytest.fixture
def tiny_whisper():
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(tiny_whisper_config()).eval()


@pytest.fixture
def tiny_moonshine():
    from transformers import MoonshineForConditionalGeneration

    return MoonshineForConditionalGeneration(tiny_moonshine_config()).eval()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small models decode faster and deterministically so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs per test run, but reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
