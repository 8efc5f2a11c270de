"""WER normalisation/scoring, and batched greedy decoding on a tiny random Whisper."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from fade_kernels.data import Utterance
from fade_kernels.eval import compute_wer, get_normalizer, normalize, wer_report, word_error_counts


def test_normaliser():
    assert normalize("Hello, World!") == normalize("hello world") == "hello world"
    # Spelled-out numbers become digits, so "twenty three" matches a hypothesis "23".
    assert normalize("I have twenty three apples.") == normalize("I have 23 apples")
    assert normalize(None) == normalize("") == ""
    # A spelling map (normalizer.json) can be supplied directly or via a tokenizer attribute.
    class Tok:
        english_spelling_normalizer = {"colour": "color"}

    assert normalize("Colour", get_normalizer(Tok())) == "color"
    assert normalize("Colour", get_normalizer({"colour": "color"})) == "color"
    assert normalize("Colour") == "colour"


def test_known_wer_values():
    assert compute_wer(["the cat sat down"], ["the cat sat down"]) == 0.0
    assert compute_wer(["the cat sat down"], ["the dog sat down"]) == pytest.approx(1 / 4)  # 1 sub
    assert compute_wer(["the cat sat down"], ["the cat down"]) == pytest.approx(1 / 4)  # 1 del
    assert compute_wer(["the cat sat"], ["the big cat sat down"]) == pytest.approx(2 / 3)  # 2 ins
    # Pooled over the corpus: (1 + 2) errors / (4 + 2) words, not the mean of 0.25 and 1.0.
    assert compute_wer(["the cat sat down", "hello there"], ["the dog sat down", ""]) == pytest.approx(3 / 6)
    # Punctuation/case differences are not errors.
    assert compute_wer(["Hello, World!"], ["hello world"]) == 0.0
    c = word_error_counts(["a b c d"], ["a x c"])
    assert (c["substitutions"], c["deletions"], c["insertions"], c["hits"], c["ref_words"]) == (1, 1, 0, 2, 4)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        compute_wer(["a", "b"], ["a"])


def test_empty_references():
    # Empty reference: hypothesis words are insertions against the other references' words.
    assert compute_wer(["", "red fox"], ["hallucination", "red fox"]) == pytest.approx(1 / 2)
    assert compute_wer([""], [""]) == 0.0
    assert compute_wer([""], ["something"]) == 1.0  # capped, not inf


def test_wer_report_per_subset():
    utts = [
        Utterance("a", "a.wav", "the cat sat down", "piper"),
        Utterance("b", "b.wav", "hello world", "piper"),
        Utterance("c", "c.wav", "alpha beta gamma delta epsilon", "noisy"),
        Utterance("d", "d.wav", None, "noisy"),
    ]
    hyps = ["the dog sat down", "Hello world.", "alpha beta gamma", "ignored"]
    r = wer_report(utts, hyps)
    assert r["wer"] == pytest.approx(3 / 11) and r["ref_words"] == 11
    assert r["n_scored"] == 3 and r["n_unlabelled"] == 1
    assert r["subsets"]["piper"]["wer"] == pytest.approx(1 / 6) and r["subsets"]["piper"]["n_scored"] == 2
    assert r["subsets"]["noisy"]["wer"] == pytest.approx(2 / 5) and r["subsets"]["noisy"]["deletions"] == 2
    assert wer_report([{"text": "a b", "subset": "x"}], ["a c"])["subsets"]["x"]["wer"] == 0.5
    with pytest.raises(ValueError):
        wer_report(utts, hyps[:2])


# --------------------------------------------------------------------------- decoding

VOCAB = 96


class FakeProcessor:
    """WhisperProcessor stand-in: real Whisper feature extractor, token i decodes to 'w<i>'
    (no hub access needed for a tokenizer). Ids < 4 are special tokens."""

    def __init__(self):
        from transformers import WhisperFeatureExtractor

        self.feature_extractor = WhisperFeatureExtractor(feature_size=80)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{int(t)}" for t in row if not (skip_special_tokens and int(t) < 4)) for row in ids]


@pytest.fixture(scope="module")
def tiny_whisper():
    torch = pytest.importorskip("torch")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    # Suppress the special ids (pad/start/EOS): with no EOS possible, every hypothesis runs
    # to the max_new_tokens bound, like a looping real model; that bound is what we check.
    model.generation_config.suppress_tokens = [0, 1, 2, 3]
    return model


@pytest.mark.slow
def test_transcribe_batches_and_bounds_length(tiny_whisper):
    from fade_kernels.eval import transcribe

    calls = []
    real_generate = tiny_whisper.generate

    def spy(**kw):
        out = real_generate(**kw)
        calls.append((kw["input_features"].shape, kw["max_new_tokens"], out.shape))
        return out

    tiny_whisper.generate = spy
    try:
        rng = np.random.default_rng(0)
        audios = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 4000, 8000, 12000, 2000)]
        hyps = transcribe(tiny_whisper, FakeProcessor(), audios, batch_size=2, max_new_tokens=6, progress=False,
                          decoder="generate")
    finally:
        del tiny_whisper.generate
    assert len(hyps) == 5 and all(isinstance(h, str) for h in hyps)
    assert [c[0][0] for c in calls] == [2, 2, 1]  # 5 clips in batches of 2
    assert all(c[0][1:] == (80, 3000) for c in calls)  # Whisper input padded to 30 s
    assert all(c[1] == 6 for c in calls)
    # Generation stopped at the bound (not before: EOS is suppressed; not after).
    assert all(c[2][1] <= 6 + 4 for c in calls)  # sequences may include a <= 4-token prompt
    assert all(len(h.split()) == 6 for h in hyps)


@pytest.mark.slow
def test_evaluate_report(tiny_whisper, tmp_path):
    from fade_kernels.eval import evaluate

    utts = []
    for k, sub in enumerate(("piper", "espeak", "noisy")):
        p = tmp_path / f"{k}.wav"
        sf.write(str(p), 0.1 * np.random.default_rng(k).standard_normal(8000), 16000)
        utts.append(Utterance(str(k), p, "some words here", sub))
    r = evaluate(tiny_whisper, FakeProcessor(), utts, batch_size=4, max_new_tokens=3, max_utts=2, progress=False)
    assert r["n_utts"] == 2 and len(r["utterances"]) == 2
    assert set(r["subsets"]) == {"piper", "espeak"}
    assert r["audio_seconds"] == pytest.approx(1.0)
    assert r["decode_seconds"] > 0 and r["rtf"] == pytest.approx(r["decode_seconds"] / 1.0, rel=0.01)
    assert r["wer"] >= 0.99  # random model, nonsense tokens: every reference word is wrong
    assert r["utterances"][0]["ref"] == "some words here" and r["utterances"][0]["hyp"]


def test_prepare_inputs_raw_waveform_extractor():
    """Moonshine-style extractors (input_values) get longest padding and an attention mask."""
    pytest.importorskip("torch")
    from transformers import Wav2Vec2FeatureExtractor

    from fade_kernels.eval.decode import prepare_inputs

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=False, return_attention_mask=True)
    inputs = prepare_inputs(fe, [np.ones(100, np.float32), np.ones(40, np.float32)])
    assert set(inputs) == {"input_values", "attention_mask"}
    assert tuple(inputs["input_values"].shape) == (2, 100)
    assert inputs["attention_mask"].sum(dim=1).tolist() == [100, 40]


def test_transcribe_restores_input_order_raw_waveform_path():
    """Clips are batched longest-first; results must come back in input order. A stub
    'Moonshine' model emits each clip's unpadded length (from attention_mask) as its token."""
    torch = pytest.importorskip("torch")
    from transformers import Wav2Vec2FeatureExtractor

    from fade_kernels.eval import transcribe

    class StubModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_values, attention_mask, max_new_tokens, do_sample, num_beams):
            assert input_values.dtype == torch.float32 and not do_sample and num_beams == 1
            return attention_mask.sum(dim=1, keepdim=True)

    class Proc:
        feature_extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, do_normalize=False, return_attention_mask=True
        )

        def batch_decode(self, ids, skip_special_tokens=True):
            return [f" len{int(r[0])} " for r in ids]

    lengths = [30, 70, 10, 50, 20]
    hyps = transcribe(StubModel(), Proc(), [np.zeros(n, np.float32) for n in lengths], batch_size=2, progress=False)
    assert hyps == [f"len{n}" for n in lengths]
