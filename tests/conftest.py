"""Shared fixtures: tiny random Whisper and Moonshine models built from configs (no hub), and a
fresh torch seed per test that a failure report prints.

Tiers (markers registered in pyproject.toml): `pytest -q` runs everything (CI);
`pytest -q -m "not slow"` is the quick tier for daily work: tests marked `compile` or
`subprocess` count as slow too (`pytest_collection_modifyitems` below adds the marker).
"""
from __future__ import annotations

import os

# The Triton interpreter must be chosen before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# pytester runs the seed-report test; reliability.faults holds the fault tests' fixtures (tiny model
# folder, a checkpoint, the `fade` runner), ops.kernel_isa the kernel tests' `isa` fixture.
pytest_plugins = ["pytester", "reliability.faults", "ops.kernel_isa"]


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
    """torch on one thread for the test: tiny matrices gain nothing from threads, and on a loaded
    machine OpenMP workers waiting for a core made such runs up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh torch seed per test (FADE_TEST_SEED=N replays one); a failing test prints it."""
    seed = int(os.environ.get("FADE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_collection_modifyitems(config, items):
    # Compiling for a GPU and starting processes take seconds each: both leave the quick tier.
    for item in items:
        if item.get_closest_marker("compile") or item.get_closest_marker("subprocess"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # The seed goes into the failure report as its own section, next to the captured output.
    outcome = yield
    report = outcome.get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("seed", f"torch seed {seed}: rerun with FADE_TEST_SEED={seed}"))
