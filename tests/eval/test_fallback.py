"""The temperature fallback (eval.fallback): its two checks, the decoder's log-probabilities
against a teacher-forced forward pass of the model, and the retry loop's choices."""
from __future__ import annotations

import pytest
import torch

from fade_kernels.eval.fallback import compression_ratio, decode_with_fallback, needs_fallback
from fade_kernels.eval.greedy import WhisperGreedyDecoder

from test_greedy import _english_whisper, _features

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny matrices; threads only wait for a core


def test_compression_ratio_flags_a_loop_and_not_a_sentence():
    assert compression_ratio("") == 0.0
    assert compression_ratio("the " * 40) > 2.4
    assert compression_ratio("Where is the nearest cash machine, please?") < 2.4
    # average log-prob = sum / (tokens + 1): -10 over 9 tokens + EOS is -1.0, not below the threshold
    assert not needs_fallback("a short text", 9, -10.0)
    assert needs_fallback("a short text", 9, -10.1)
    assert needs_fallback("the " * 40, 40, 0.0)


def _teacher_forced_logprobs(model, decoder, encoded, prompt, tokens, with_eos):
    """Sum over `tokens` (and EOS) of log p from one forward pass of the whole sequence, with the
    decoder's suppression applied (every step, plus the begin mask at the first new position)."""
    ids = torch.tensor([prompt + tokens + ([decoder.eos] if with_eos else [])])
    with torch.inference_mode():
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=ids[:, :-1]).logits[0].float().clone()
    logits = logits[len(prompt) - 1:].clone()
    logits[:, decoder.suppress_tokens] = -float("inf")
    logits[0, decoder.begin_suppress_tokens] = -float("inf")
    targets = ids[0, len(prompt):]
    return float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum())


@pytest.mark.parametrize("eos", [1, 5])
def test_sum_logprobs_equal_a_teacher_forced_forward(eos, _fresh_seed):
    model = _english_whisper()
    model.generation_config.eos_token_id = model.config.eos_token_id = eos
    decoder = WhisperGreedyDecoder(model)
    with torch.inference_mode():
        encoded = model.model.encoder(input_features=_features(3, torch.Generator().manual_seed(_fresh_seed))).last_hidden_state
        scores: list[float] = []
        rows = decoder.generate(encoded, max_new_tokens=12, sum_logprobs=scores)
    prompt = decoder.prompts(encoded)[0].tolist()
    for i, tokens in enumerate(rows):
        with_eos = len(tokens) < 12                       # stopped by EOS, whose log p is counted
        expected = _teacher_forced_logprobs(model, decoder, encoded[i:i + 1], prompt, tokens, with_eos)
        assert scores[i] == pytest.approx(expected, abs=1e-3), f"seed {_fresh_seed}, row {i}"


def _to_text(ids):
    return [" ".join(map(str, row)) for row in ids]


def test_fallback_keeps_greedy_rows_that_pass_and_retries_the_others(_fresh_seed):
    model = _english_whisper()
    decoder = WhisperGreedyDecoder(model)
    with torch.inference_mode():
        encoded = model.model.encoder(input_features=_features(2, torch.Generator().manual_seed(_fresh_seed))).last_hidden_state
        greedy = _to_text(decoder.generate(encoded, max_new_tokens=8))
        texts, kept = decode_with_fallback(decoder, encoded, _to_text, max_new_tokens=8,
                                           compression_ratio_threshold=1e9, logprob_threshold=-1e9)
        assert texts == greedy and kept == [0.0, 0.0]
        # Every decoding fails: each row goes through every temperature and keeps the last try.
        texts, kept = decode_with_fallback(decoder, encoded, _to_text, max_new_tokens=8, logprob_threshold=1e9,
                                           seed=3)
        again, _ = decode_with_fallback(decoder, encoded, _to_text, max_new_tokens=8, logprob_threshold=1e9, seed=3)
    assert kept == [1.0, 1.0] and texts == again, f"seed {_fresh_seed}"


def test_sampling_at_high_temperature_leaves_the_greedy_path(_fresh_seed):
    model = _english_whisper()
    decoder = WhisperGreedyDecoder(model)
    with torch.inference_mode():
        encoded = model.model.encoder(input_features=_features(4, torch.Generator().manual_seed(_fresh_seed))).last_hidden_state
        greedy = decoder.generate(encoded, max_new_tokens=10)
        sampled = decoder.generate(encoded, max_new_tokens=10, temperature=5.0,
                                   generator=torch.Generator().manual_seed(_fresh_seed))
    assert greedy != sampled, f"seed {_fresh_seed}"
    suppressed = set(decoder.suppress_tokens)
    assert not any(t in suppressed for row in sampled for t in row)   # sampling respects the masks


def test_fallback_needs_the_lean_decoder():
    from fade_kernels.eval.decode import transcribe

    with pytest.raises(ValueError, match="temperature_fallback needs the lean decoder"):
        transcribe(_english_whisper(), None, [], decoder="generate", temperature_fallback=True, progress=False)
