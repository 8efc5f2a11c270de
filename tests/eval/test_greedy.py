"""The lean greedy decoder gives generate()'s tokens: prompts, suppression, EOS, max_new_tokens,
batches whose rows stop at different steps, multilingual language/task tokens and detection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fade_kernels.eval.decode import _generation_setup, prepare_inputs, transcribe
from fade_kernels.eval.greedy import WhisperGreedyDecoder, unsupported_generation_settings, whisper_prompt

from conftest import tiny_whisper_config


def _english_whisper(**overrides):
    """A random Whisper with an English-only generation config: <|notimestamps|> = 127 (the last
    id: generate() reads ids above it as timestamps), suppressed ids at every step and at the first
    generated position. EOS is 1, the start token, which is suppressed: no row ends before
    max_new_tokens unless a test picks another EOS."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(tiny_whisper_config(max_source_positions=50, **overrides)).eval()
    gen = model.generation_config
    gen.no_timestamps_token_id = 127
    gen.is_multilingual = False
    gen.suppress_tokens = [0, 1, 3, 9, 40, 77, 127]   # the prompt's 1 and 127 among them
    gen.eos_token_id = model.config.eos_token_id = 1
    gen.begin_suppress_tokens = [11, 12]
    gen.max_length = 64
    return model


def _multilingual_whisper():
    model = _english_whisper()
    gen = model.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": 20, "<|de|>": 21, "<|fr|>": 22}
    gen.task_to_id = {"transcribe": 24, "translate": 23}
    return model


def _features(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 80, 100, generator=generator) * 0.5


def _generate_tokens(model, features, max_new_tokens, **kwargs) -> list[list[int]]:
    """generate()'s greedy tokens per row after the prompt, without padding and the final EOS."""
    with torch.inference_mode():
        # return_dict_in_generate: the sequences of the one short-form generate call, prompt included.
        out = model.generate(input_features=features, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             return_dict_in_generate=True, **kwargs).sequences
    prompt = whisper_prompt(model.generation_config)
    assert out[:, :len(prompt)].tolist() == [prompt] * out.shape[0]
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out[:, len(prompt):].tolist()]


def _lean_tokens(model, features, max_new_tokens, **kwargs) -> list[list[int]]:
    decoder = WhisperGreedyDecoder(model)
    with torch.inference_mode():
        encoded = model.model.encoder(input_features=features).last_hidden_state
    return decoder.generate(encoded, max_new_tokens=max_new_tokens, **kwargs)


def test_prompt_of_english_and_multilingual_configs():
    english = _english_whisper().generation_config
    assert whisper_prompt(english) == [1, 127]
    multi = _multilingual_whisper().generation_config
    assert whisper_prompt(multi) is None                                 # no language: detected
    assert whisper_prompt(multi, language="de") == [1, 21, 24, 127]        # task defaults to transcribe
    assert whisper_prompt(multi, language="<|fr|>", task="translate") == [1, 22, 23, 127]
    multi.forced_decoder_ids = [[1, 20], [2, 23]]
    assert whisper_prompt(multi) == [1, 20, 23, 127]
    with pytest.raises(ValueError, match="English-only"):
        whisper_prompt(english, language="de")
    with pytest.raises(ValueError, match="task must be one of"):
        whisper_prompt(multi, language="de", task="summarize")


def test_unsupported_settings_are_named():
    gen = _english_whisper().generation_config
    assert unsupported_generation_settings(gen) == []
    gen.num_beams, gen.repetition_penalty = 4, 1.3
    assert unsupported_generation_settings(gen) == ["num_beams=4", "repetition_penalty=1.3"]


@pytest.mark.parametrize("batch", [1, 4])
def test_same_tokens_as_generate_with_eos_at_different_steps(batch, one_thread, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model = _english_whisper()
    features = _features(batch, generator)
    # A random model rarely says EOS: make EOS the token row 0 greedily emits at step 3, so that
    # row stops there and the others (other audio) stop elsewhere or run to max_new_tokens.
    first = _lean_tokens(model, features, 12)
    eos = first[0][3]
    model.generation_config.eos_token_id = model.config.eos_token_id = eos
    model.generation_config.pad_token_id = model.config.pad_token_id = eos
    expected = _generate_tokens(model, features, 12)
    got = _lean_tokens(model, features, 12)
    assert got == expected, f"seed {_fresh_seed}"
    assert len(got[0]) <= 3 and all(len(row) <= 12 for row in got)
    suppressed = set(model.generation_config.suppress_tokens)
    assert not any(t in suppressed for row in got for t in row)
    assert not any(row and row[0] in (11, 12) for row in got)           # begin-suppressed at step 0


def test_max_new_tokens_is_capped_by_max_target_positions(one_thread, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model = _english_whisper(max_target_positions=16)
    features = _features(2, generator)
    got = _lean_tokens(model, features, 100)
    assert [len(row) for row in got] == [14, 14]                         # 16 positions - 2 prompt tokens
    assert got == _generate_tokens(model, features, 14), f"seed {_fresh_seed}"


@pytest.mark.parametrize("language,task", [("de", None), ("fr", "translate"), (None, None)])
def test_multilingual_prompts_and_detection_match_generate(language, task, one_thread, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model = _multilingual_whisper()
    features = _features(3, generator)
    kwargs = {k: v for k, v in (("language", language), ("task", task)) if v is not None}
    with torch.inference_mode():
        # return_dict_in_generate: the sequences of the one short-form generate call, prompt included.
        out = model.generate(input_features=features, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             **kwargs).sequences
    decoder = WhisperGreedyDecoder(model)
    with torch.inference_mode():
        encoded = model.model.encoder(input_features=features).last_hidden_state
        prompts = decoder.prompts(encoded, language, task)
        got = decoder.generate(encoded, prompts, max_new_tokens=6)
        if language is None:
            detected = model.detect_language(input_features=features).tolist()
            assert prompts[:, 1].tolist() == detected, f"seed {_fresh_seed}"
    p = prompts.shape[1]
    assert torch.equal(out[:, :p], prompts), f"seed {_fresh_seed}"
    assert [row[p:] for row in out.tolist()] == got, f"seed {_fresh_seed}"


class _Processor:
    def __init__(self):
        from transformers import WhisperFeatureExtractor

        self.feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) not in (1, 127)) for row in ids]


def test_transcribe_lean_equals_transcribe_generate(one_thread, _fresh_seed):
    rng = np.random.default_rng(_fresh_seed)
    model = _english_whisper()
    audios = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 9000, 12000)]
    lean = transcribe(model, _Processor(), audios, batch_size=2, max_new_tokens=5, progress=False, decoder="lean")
    plain = transcribe(model, _Processor(), audios, batch_size=2, max_new_tokens=5, progress=False,
                       decoder="generate")
    assert lean == plain and all(len(h.split()) == 5 for h in lean), f"seed {_fresh_seed}"
    model.generation_config.num_beams = 2
    with pytest.raises(ValueError, match="num_beams=2"):
        transcribe(model, _Processor(), audios, decoder="lean", progress=False)


@pytest.mark.slow
def test_bundled_tiny_en_same_tokens_as_generate():
    """Real weights and speech: espeak-ng sentences of different lengths, batch 1 and 3."""
    from fade_kernels.data.synth import SynthesisUnavailable, synthesize_espeak

    try:
        from fade_kernels.models.bundled import load_model_and_processor

        model, processor = load_model_and_processor("bundled:tiny.en")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"bundled:tiny.en unavailable: {exc}")
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Please call Stella and ask her to bring these things with her from the store.",
                 "Good morning."]
    try:
        audios = [synthesize_espeak(s, speed=150) for s in sentences]
    except SynthesisUnavailable as exc:
        pytest.skip(str(exc))
    lean = transcribe(model, processor, audios, batch_size=3, progress=False, decoder="lean")
    single = transcribe(model, processor, audios, batch_size=1, progress=False, decoder="lean")
    plain = transcribe(model, processor, audios, batch_size=1, progress=False, decoder="generate")
    assert lean == single == plain
    assert "lazy dog" in lean[0].lower() and "morning" in lean[2].lower()
    # Token level, batched: the lean tokens are generate()'s up to EOS.
    decoder = WhisperGreedyDecoder(model)
    features = prepare_inputs(processor, audios, model)["input_features"]
    with torch.inference_mode(), _generation_setup(model) as processors:
        from transformers import LogitsProcessorList

        out = model.generate(input_features=features, max_new_tokens=64,
                             logits_processor=LogitsProcessorList(processors)).tolist()
        encoded = model.model.encoder(input_features=features).last_hidden_state
    got = decoder.generate(encoded, max_new_tokens=64)
    special = set(whisper_prompt(model.generation_config)) | {model.generation_config.eos_token_id}
    assert [[t for t in row if t not in special] for row in out] == got
