"""Batched greedy transcription and dev-set evaluation for HF seq2seq ASR models.

Handles Whisper (log-mel `input_features`, always padded to 30 s) and raw-waveform models
such as Moonshine (`input_values` + `attention_mask`, padded to the longest in the batch).
Decoding is short-form only: Whisper input longer than 30 s is truncated by its feature
extractor (a warning is logged).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from fade_kernels.data.audio import TARGET_SR, load_audio
from fade_kernels.eval.wer import get_normalizer, wer_report

log = logging.getLogger(__name__)


def _feature_extractor(processor: Any) -> Any:
    return getattr(processor, "feature_extractor", processor)


def _batch_decode(processor: Any, ids: Any) -> list[str]:
    dec = getattr(processor, "batch_decode", None)
    if dec is None:
        dec = processor.tokenizer.batch_decode
    return [t.strip() for t in dec(ids, skip_special_tokens=True)]


def _model_float_dtype(model: Any):
    import torch

    # Quantized modules may hold integer buffers/params; take the first floating one.
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: Any):
    import torch

    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_inputs(processor: Any, audios: Sequence[np.ndarray], model: Any = None) -> dict:
    """Feature-extract one batch. audios: list of float32 (n_samples,) at 16 kHz.

    Returns generate() keyword tensors: Whisper -> {"input_features": (B, n_mels, 3000)};
    raw-waveform extractors (model_input_names has "input_values") -> {"input_values": (B, T),
    "attention_mask": (B, T)} padded to the longest clip, since such models are not trained
    on a fixed 30 s window and the mask tells them where the padding is.
    """
    fe = _feature_extractor(processor)
    names = list(getattr(fe, "model_input_names", ["input_features"]))
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    if "input_features" in names:
        n_max = getattr(fe, "n_samples", 30 * TARGET_SR)
        if any(a.size > n_max for a in audios):
            log.warning("audio longer than %.0f s is truncated (short-form decoding only)", n_max / TARGET_SR)
        # Whisper's encoder expects exactly 30 s of frames: pad to max_length, not to longest.
        feats = fe(audios, sampling_rate=TARGET_SR, return_tensors="pt", padding="max_length")
        inputs = {"input_features": feats["input_features"]}
    elif "input_values" in names:
        feats = fe(audios, sampling_rate=TARGET_SR, return_tensors="pt", padding="longest", return_attention_mask=True)
        inputs = {"input_values": feats["input_values"]}
        if "attention_mask" in feats:
            inputs["attention_mask"] = feats["attention_mask"]
    else:
        raise ValueError(f"unsupported feature extractor inputs {names} ({type(fe).__name__})")
    if model is not None:
        dtype, device = _model_float_dtype(model), _model_device(model)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return inputs


def transcribe(
    model: Any,
    processor: Any,
    audios: Sequence[np.ndarray],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> list[str]:
    """Greedy-decode each clip; returns one stripped string per input, in input order.

    audios: list of float32 (n_samples,) at 16 kHz. Clips are batched longest-first (less
    padding for raw-waveform models; harmless for Whisper's fixed 30 s window).
    max_new_tokens bounds every hypothesis so a looping decoder cannot hang an evaluation.
    """
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
    hyps: list[str | None] = [None] * len(audios)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), tqdm(
            total=len(audios), desc="decode", unit="utt", disable=not progress, leave=False
        ) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                inputs = prepare_inputs(processor, [audios[i] for i in idx], model)
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
                ids = getattr(out, "sequences", out)
                for i, text in zip(idx, _batch_decode(processor, ids)):
                    hyps[i] = text
                bar.update(len(idx))
    finally:
        if was_training:
            model.train()
    return [h or "" for h in hyps]


def evaluate(
    model: Any,
    processor: Any,
    utterances: Sequence[Any],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    max_utts: int | None = None,
    progress: bool = True,
) -> dict:
    """Transcribe `utterances` (corpus.Utterance: .id, .audio path, .text, .subset) and score.

    max_utts: keep only the first N (use data.select_subset beforehand for a random subset).
    Returns wer_report(...) plus n_utts, audio_seconds, decode_seconds (wall time of
    transcribe, excluding file loading), rtf = decode_seconds / audio_seconds, and
    "utterances": [{"id", "subset", "ref", "hyp"}].
    """
    utts = list(utterances)[: max_utts if max_utts is not None else None]
    audios = [load_audio(u.audio) for u in utts]
    audio_seconds = float(sum(a.size for a in audios)) / TARGET_SR
    t0 = time.perf_counter()
    hyps = transcribe(model, processor, audios, batch_size, max_new_tokens, progress)
    decode_seconds = time.perf_counter() - t0
    # Use the checkpoint's spelling map if its tokenizer has one (e.g. openai/whisper-*).
    report = wer_report(utts, hyps, normalizer=get_normalizer(processor))
    report.update(
        n_utts=len(utts),
        audio_seconds=round(audio_seconds, 3),
        decode_seconds=round(decode_seconds, 3),
        rtf=decode_seconds / audio_seconds if audio_seconds > 0 else float("nan"),
        utterances=[
            {"id": u.id, "subset": u.subset, "ref": u.text, "hyp": h} for u, h in zip(utts, hyps)
        ],
    )
    return report
