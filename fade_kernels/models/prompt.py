"""Which decoder prompt a model transcribes English with: one rule for calibration and decoding.

English-only Whisper checkpoints (tiny.en ...) start every transcript with
``<|startoftranscript|><|notimestamps|>``. Multilingual ones (base, large-v3, ...) would detect
the language and could translate; they transcribe English with the language and task forced:
``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``. Calibration teacher-forces this
prompt before the reference tokens (calib.samples) and evaluation decodes after it
(eval.decode), so both see the same sequence start. Other families (Moonshine) start with
their decoder start token only.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TRANSCRIBE_LANGUAGE", "TRANSCRIBE_TASK", "is_multilingual", "transcription_prompt",
           "generate_prompt_kwargs"]

TRANSCRIBE_LANGUAGE = "en"
TRANSCRIBE_TASK = "transcribe"


def _generation_config(model: Any) -> Any:
    return getattr(model, "generation_config", None)


def is_multilingual(model: Any) -> bool:
    """True for a Whisper checkpoint whose generation config lists languages to choose from."""
    generation = _generation_config(model)
    return bool(getattr(generation, "is_multilingual", False) and getattr(generation, "lang_to_id", None))


def transcription_prompt(model: Any) -> list[int]:
    """Decoder prompt token ids (int list) for English transcription without timestamps.

    Whisper: start-of-transcript, then for multilingual checkpoints <|en|> and <|transcribe|>,
    then <|notimestamps|> when the checkpoint has one. Other models: the decoder start token.
    Raises ValueError when a multilingual checkpoint has no <|en|> or transcribe token.
    """
    config = getattr(model, "config", None)
    generation = _generation_config(model)
    start = getattr(generation, "decoder_start_token_id", None) or config.decoder_start_token_id
    prompt = [start]
    if getattr(config, "model_type", "") != "whisper":
        return prompt
    if is_multilingual(model):
        lang = generation.lang_to_id.get(f"<|{TRANSCRIBE_LANGUAGE}|>")
        task = (getattr(generation, "task_to_id", None) or {}).get(TRANSCRIBE_TASK)
        if lang is None or task is None:
            raise ValueError("multilingual Whisper checkpoint without an <|en|> or transcribe token in its generation config")
        prompt += [lang, task]
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    if no_timestamps is not None:
        prompt.append(no_timestamps)
    return prompt


def generate_prompt_kwargs(model: Any) -> dict:
    """Keyword arguments that make transformers' Whisper ``generate()`` start from
    :func:`transcription_prompt`: language and task for multilingual checkpoints, none otherwise
    (``generate()`` then adds <|notimestamps|> itself, as timestamps are not requested)."""
    if is_multilingual(model):
        return {"language": TRANSCRIBE_LANGUAGE, "task": TRANSCRIBE_TASK}
    return {}
