"""Loop-robust decoding: openai-whisper's temperature fallback, on the lean Whisper decoder.

Greedy decoding sometimes falls into a loop ("the the the ...") or settles on a transcript the
model itself finds unlikely, more often after quantization. openai-whisper's `transcribe`
guards against both: it decodes at temperature 0 and, when the result fails either check below,
decodes again by sampling at the next temperature of (0.2, 0.4, 0.6, 0.8, 1.0), keeping the first
result that passes (or the last one tried):

  compression ratio  len(text bytes) / len(zlib.compress(text bytes)) > 2.4: a repetitive text
                     compresses well, so a high ratio flags a loop;
  average log-prob   sum of log p(token) over the emitted tokens and the end-of-text token,
                     divided by (tokens + 1), < -1.0: the model was unsure of its own transcript.

Differences from openai-whisper, kept small on purpose: one sample per temperature (its
`best_of=5` draws five and keeps the likeliest), no "no speech" probability (its check that
skips the fallback on silence), and each retry runs only the rows that still fail. Method
comparisons stay greedy; this is an option of `fade transcribe` / `fade eval`
(`--temperature-fallback`).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import torch

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0


def compression_ratio(text: str) -> float:
    """len(text as UTF-8) / len(zlib-compressed); 0.0 for an empty text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def needs_fallback(text: str, tokens: int, sum_logprob: float,
                   compression_ratio_threshold: float = COMPRESSION_RATIO_THRESHOLD,
                   logprob_threshold: float = LOGPROB_THRESHOLD) -> bool:
    """True when a decoding fails openai-whisper's checks: compression ratio above the threshold
    (a loop) or average log-probability sum_logprob / (tokens + 1) below it."""
    return compression_ratio(text) > compression_ratio_threshold or sum_logprob / (tokens + 1) < logprob_threshold


def decode_with_fallback(decoder: Any, encoder_hidden: torch.Tensor, to_text: Callable[[list[list[int]]], list[str]],
                         max_new_tokens: int = 128, language: str | None = None, task: str | None = None,
                         temperatures: Sequence[float] = TEMPERATURES, seed: int = 0,
                         compression_ratio_threshold: float = COMPRESSION_RATIO_THRESHOLD,
                         logprob_threshold: float = LOGPROB_THRESHOLD) -> tuple[list[str], list[float]]:
    """Transcripts of a batch with the temperature fallback, and the temperature each one kept.

    decoder: eval.greedy.WhisperGreedyDecoder. encoder_hidden: (B, frames, d_model) encoder output.
    to_text: token lists -> texts (the processor's batch_decode). Sampling draws from a
    torch.Generator seeded with `seed`, so a run is reproducible.
    """
    generator = torch.Generator(device=encoder_hidden.device).manual_seed(seed)
    texts: list[str] = [""] * encoder_hidden.shape[0]
    kept: list[float] = [0.0] * encoder_hidden.shape[0]
    pending = list(range(encoder_hidden.shape[0]))
    prompt = decoder.prompts(encoder_hidden, language, task)
    for attempt, temperature in enumerate(temperatures):
        last = attempt == len(temperatures) - 1
        keep = torch.tensor(pending, device=encoder_hidden.device)
        scores: list[float] = []
        ids = decoder.generate(encoder_hidden.index_select(0, keep), prompt.index_select(0, keep),
                               max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
                               sum_logprobs=scores)
        failing = []
        for row, tokens, text, score in zip(pending, ids, to_text(ids), scores):
            texts[row], kept[row] = text, temperature
            if not last and needs_fallback(text, len(tokens), score, compression_ratio_threshold, logprob_threshold):
                failing.append(row)
        pending = failing
        if not pending:
            break
    return texts, kept


__all__ = ["TEMPERATURES", "COMPRESSION_RATIO_THRESHOLD", "LOGPROB_THRESHOLD", "compression_ratio", "needs_fallback",
           "decode_with_fallback"]
