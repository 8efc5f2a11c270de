"""Batched greedy transcription and dev-set evaluation for HF seq2seq ASR models.

Handles Whisper (log-mel `input_features`, always padded to 30 s) and raw-waveform models
such as Moonshine (`input_values` + `attention_mask`, padded to the longest in the batch).
Decoding is short-form only: Whisper input longer than 30 s is truncated by its feature
extractor (a warning is logged).

Speed (tiny.en, 221 utterances of the synthetic dev set, 2-core VM shared with other jobs):
the fp32 evaluation took 72-80 s when the machine was quiet and 160-350 s under a load of 4-7.
`dequantized_linears` runs a quantized model's linears as dense float32 GEMMs on the exact
dequantized weights (4-bit RTN: 75 s vs 89 s through the packed kernels, identical hypotheses;
the packed kernels are 2-8x slower than the dense GEMM at encoder-sized M = 8 x 1500 rows), and
the token-suppression masks are built once per call instead of with `torch.isin` over the whole
vocabulary at every decoding step (13-67 ms per step -> 0.5 ms).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Sequence

import numpy as np

from fade_kernels.data.audio import TARGET_SR, load_audio
from fade_kernels.eval.fallback import decode_with_fallback
from fade_kernels.eval.wer import get_normalizer, wer_report
from fade_kernels.models.prompt import generate_prompt_kwargs

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


class MaskedSuppress:
    """A logits processor equivalent to transformers' SuppressTokensLogitsProcessor plus (for
    Whisper) SuppressTokensAtBeginLogitsProcessor, with the vocabulary masks built once.

    The stock processors rebuild a bool (V,) mask with torch.isin over the whole vocabulary at
    every step (~50 ms per call for Whisper's V = 51864 on this VM, about 15 % of tiny.en's decode
    time). scores: float (B, V) -> (B, V) with suppressed ids set to -inf, exactly as they do.
    begin_index: length of the decoder prompt; Whisper's generate() sets it per segment through
    set_begin_index, the only caller that uses begin_suppress here.
    """

    def __init__(self, suppress: Sequence[int] | None, begin_suppress: Sequence[int] | None = None,
                 begin_index: int | None = None):
        self.suppress = list(suppress or [])
        self.begin_suppress = list(begin_suppress or [])
        self.begin_index = begin_index
        self._masks: dict[tuple, Any] = {}

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def _mask(self, ids: list[int], scores: Any):
        import torch

        key = (id(ids), scores.shape[-1], scores.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            valid = [i for i in ids if 0 <= i < scores.shape[-1]]
            mask[valid] = True
            self._masks[key] = mask
        return mask

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.suppress:
            scores = scores.masked_fill(self._mask(self.suppress, scores), -float("inf"))
        if self.begin_suppress and input_ids.shape[-1] == self.begin_index:
            scores = scores.masked_fill(self._mask(self.begin_suppress, scores), -float("inf"))
        return scores


class _DropLengthWarning(logging.Filter):
    """Drops transformers' "Both `max_new_tokens` and `max_length` seem to have been set" record.

    Whisper's generate() always hands the generic generate() a config with max_length filled in,
    so every batch decoded with max_new_tokens (which takes precedence, as intended) logs it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Both `max_new_tokens`")


@contextlib.contextmanager
def _generation_setup(model: Any) -> Iterator[list]:
    """Prepare `model` for generate(max_new_tokens=...) calls and undo it on exit; yields the
    extra logits processors to pass.

    suppress_tokens move from model.generation_config into a MaskedSuppress (same effect, masks
    built once), and begin_suppress_tokens too for Whisper, whose generate() calls
    set_begin_index on every processor. The max_new_tokens/max_length warning is filtered.
    """
    length_logger = logging.getLogger("transformers.generation.utils")
    length_filter = _DropLengthWarning()
    length_logger.addFilter(length_filter)
    gen = getattr(model, "generation_config", None)
    saved, processors = {}, []
    if gen is not None:
        is_whisper = getattr(getattr(model, "config", None), "model_type", "") == "whisper"
        suppress = gen.suppress_tokens
        begin = gen.begin_suppress_tokens if is_whisper else None
        if suppress or begin:
            processors.append(MaskedSuppress(suppress, begin))
            saved["suppress_tokens"] = suppress
            gen.suppress_tokens = None
            if is_whisper:
                saved["begin_suppress_tokens"] = begin
                gen.begin_suppress_tokens = None
    try:
        yield processors
    finally:
        for key, value in saved.items():
            setattr(gen, key, value)
        length_logger.removeFilter(length_filter)


@contextlib.contextmanager
def dequantized_linears(model: Any) -> Iterator[int]:
    """Temporarily replace every QuantLinear of `model` by an nn.Linear holding its dequantized
    float32 weight (N, K) = QuantLinear.dequantize() and its bias; restore them on exit.

    The model computes the same function (the quantized weights), through the dense GEMM: for
    accuracy evaluation only (it measures WER, not the packed kernels). Yields the number of
    layers replaced.
    """
    import torch
    from torch import nn

    from fade_kernels.nn.quant_linear import QuantLinear

    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.qweight.device)
        with torch.no_grad():
            dense.weight.copy_(module.dequantize())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        dense.requires_grad_(False)
        setattr(parent, child, dense)
        swapped.append((parent, child, module))
    try:
        yield len(swapped)
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


DECODERS = ("auto", "lean", "generate")


def _lean_decoder(model: Any, decoder: str):
    """The WhisperGreedyDecoder to use for `decoder` ("auto", "lean", "generate"), or None for generate()."""
    from fade_kernels.eval.greedy import WhisperGreedyDecoder, is_whisper, unsupported_generation_settings

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "generate":
        return None
    why = None if is_whisper(model) else f"{type(model).__name__} is not a Whisper model"
    if why is None:
        unsupported = unsupported_generation_settings(model.generation_config)
        if unsupported:
            why = f"its generation_config sets {', '.join(unsupported)}"
    if why is not None:
        if decoder == "lean":
            raise ValueError(f"decoder 'lean' cannot decode this model: {why}")
        log.info("decoding with generate(): %s", why)
        return None
    return WhisperGreedyDecoder(model)


def transcribe(
    model: Any,
    processor: Any,
    audios: Sequence[np.ndarray],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = True,
    decoder: str = "auto",
    language: str | None = None,
    task: str | None = None,
    temperature_fallback: bool = False,
) -> list[str]:
    """Greedy-decode each clip; returns one stripped string per input, in input order.

    audios: list of float32 (n_samples,) at 16 kHz. Clips are batched longest-first: similar
    lengths decode to similar token counts, so a batch's rows finish at about the same step
    (and raw-waveform models get less padding; Whisper's encoder always sees 30 s windows).
    max_new_tokens bounds every hypothesis so a looping decoder cannot hang an evaluation.
    decoder: "lean" runs Whisper models through eval.greedy.WhisperGreedyDecoder (static
    key/value cache, same tokens as generate()); "generate" uses the model's generate();
    "auto" (default) picks "lean" for Whisper models whose generation_config it reproduces.
    language / task: Whisper prompt tokens for multilingual models (default: the generation
    config's, else the language is detected per utterance as generate() does).
    temperature_fallback: decode again, sampling at rising temperatures, the clips whose greedy
    transcript loops or is unlikely (eval.fallback, openai-whisper's rule); needs the lean decoder.
    """
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lean = _lean_decoder(model, decoder)
    if temperature_fallback and lean is None:
        raise ValueError("temperature_fallback needs the lean decoder: a Whisper model with decoder='lean' or 'auto'")
    order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
    hyps: list[str | None] = [None] * len(audios)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), _generation_setup(model) as processors, tqdm(
            total=len(audios), desc="decode", unit="utt", disable=not progress, leave=False
        ) as bar:
            # Multilingual checkpoints: force <|en|><|transcribe|> (the prompt calibration uses) unless
            # the caller names a language or task; both decoders get the same prompt.
            forced = generate_prompt_kwargs(model)
            language = language if language is not None else forced.get("language")
            task = task if task is not None else forced.get("task")
            extra = {name: value for name, value in (("language", language), ("task", task)) if value is not None}
            if processors:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList(processors)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                inputs = prepare_inputs(processor, [audios[i] for i in idx], model)
                if lean is not None:
                    encoded = model.model.encoder(input_features=inputs["input_features"]).last_hidden_state
                    if temperature_fallback:
                        texts, _ = decode_with_fallback(lean, encoded, lambda ids: _batch_decode(processor, ids),
                                                        max_new_tokens, language, task, seed=start)
                    else:
                        texts = _batch_decode(processor, lean.generate(encoded, max_new_tokens=max_new_tokens,
                                                                       language=language, task=task))
                else:
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         **extra)
                    texts = _batch_decode(processor, getattr(out, "sequences", out))
                for i, text in zip(idx, texts):
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
    dequantize: bool = False,
    audios: Sequence[np.ndarray] | None = None,
    decoder: str = "auto",
    language: str | None = None,
    temperature_fallback: bool = False,
) -> dict:
    """Transcribe `utterances` (corpus.Utterance: .id, .audio path, .text, .subset) and score.

    max_utts: keep only the first N (use data.select_subset beforehand for a random subset).
    dequantize: run QuantLinear layers as dense float32 linears on their dequantized weights
    (see dequantized_linears): the same model, faster on CPU, for WER only.
    audios: the already-loaded float32 (n_samples,) clips of `utterances` (after max_utts), to
    skip reading the files again when one evaluation set is decoded many times.
    decoder, language, temperature_fallback: as in transcribe().
    Returns wer_report(...) plus n_utts, audio_seconds, decode_seconds (wall time of
    transcribe, excluding file loading), rtf = decode_seconds / audio_seconds, and
    "utterances": [{"id", "subset", "ref", "hyp"}].
    """
    utts = list(utterances)[: max_utts if max_utts is not None else None]
    if audios is None:
        audios = [load_audio(u.audio) for u in utts]
    elif len(audios) != len(utts):
        raise ValueError(f"audios must hold one clip per evaluated utterance ({len(utts)}), got {len(audios)}")
    audio_seconds = float(sum(a.size for a in audios)) / TARGET_SR
    t0 = time.perf_counter()
    with dequantized_linears(model) if dequantize else contextlib.nullcontext():
        hyps = transcribe(model, processor, audios, batch_size, max_new_tokens, progress, decoder, language,
                          temperature_fallback=temperature_fallback)
    decode_seconds = time.perf_counter() - t0
    # Use the checkpoint's spelling map if its tokenizer has one (e.g. openai/whisper-*).
    report = wer_report(utts, hyps, normalizer=get_normalizer(processor))
    report.update(
        n_utts=len(utts),
        audio_seconds=round(audio_seconds, 3),
        decode_seconds=round(decode_seconds, 6),  # rtf below uses the unrounded value
        rtf=decode_seconds / audio_seconds if audio_seconds > 0 else float("nan"),
        utterances=[
            {"id": u.id, "subset": u.subset, "ref": u.text, "hyp": h} for u, h in zip(utts, hyps)
        ],
    )
    return report
