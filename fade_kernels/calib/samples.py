"""Calibration samples: one utterance's encoder input, its length and its decoder tokens."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fade_kernels.models.adapters import ModelAdapter, get_adapter


@dataclass
class CalibSample:
    """encoder_input: float32, Whisper (n_mels, 3000) log-mel / Moonshine (n_samples,) audio.
    n_samples: length of the real audio at 16 kHz (to mask padded encoder frames).
    decoder_ids: int64 (L,): prompt + transcript + end-of-text, the teacher-forced sequence.
    source: index of the utterance the sample was made from (augmented copies share their
    clip's); FADE's cross-fitting halves split by it, so a clip and its copies sit in one half.
    None: the sample's position in its list stands for it."""

    encoder_input: torch.Tensor
    n_samples: int
    decoder_ids: torch.Tensor
    source: int | None = None


def prepare_samples(model, processor, utterances, adapter: ModelAdapter | None = None,
                    progress: bool = True, augmentations: tuple[str, ...] = (), seed: int = 0) -> list[CalibSample]:
    """Audio files -> CalibSample list.

    utterances: fade_kernels.data.corpus.Utterance items (audio path, optional text). Decoder
    tokens come from the reference transcript; an utterance without text is transcribed by
    the full-precision `model` (greedy) and its own tokens are used, as docs/methods.md §7 says.
    augmentations: names from calib.augment.AUGMENTATIONS; each adds one perturbed copy of every
    clip, right after it, with the clip's tokens and `source` (drawn from a Generator seeded with
    `seed`). The list holds len(utterances) * (1 + len(augmentations)) samples.
    """
    import numpy as np

    from fade_kernels.calib.augment import augment
    from fade_kernels.data.audio import load_audio

    if not utterances:
        raise ValueError("calibration needs at least one utterance; the calibration set is empty")
    adapter = adapter or get_adapter(model)
    feature_extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    prompt = adapter.decoder_prompt(model, tokenizer)
    eos = model.config.eos_token_id
    max_len = getattr(model.config, "max_target_positions", None) or getattr(model.config, "max_position_embeddings", 448)
    window = getattr(feature_extractor, "n_samples", None)   # Whisper's fixed input (30 s); None: any length
    rng = np.random.default_rng(seed)
    samples = []
    for index, utt in enumerate(tqdm(utterances, desc="calibration audio", disable=not progress)):
        audio = load_audio(utt.audio)
        if window and len(audio) > window:
            warnings.warn(f"calibration clip {utt.audio} is {len(audio) / 16000:.1f} s long; only its first "
                          f"{window / 16000:.0f} s (the model's input window) are used", stacklevel=2)
        features = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
        if utt.text:
            ids = prompt + adapter.transcript_ids(tokenizer, utt.text) + [eos]
        else:
            ids = _greedy_ids(model, adapter, features, prompt)
        ids = torch.tensor(ids[:max_len], dtype=torch.long)
        for clip in [audio, *(augment(audio, kind, rng) for kind in augmentations)]:
            if clip is not audio:
                features = feature_extractor(clip, sampling_rate=16000, return_tensors="pt")
            encoder_input = features[adapter.encoder_input_name()][0].float()
            samples.append(CalibSample(encoder_input, len(clip), ids, source=index))
    return samples


@torch.no_grad()
def _greedy_ids(model, adapter, features, prompt, max_new_tokens: int = 128) -> list[int]:
    inputs = {k: v for k, v in features.items() if k in (adapter.encoder_input_name(), "attention_mask")}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    ids = out[0].tolist()
    # generate() returns the whole sequence including the prompt for Whisper; keep one prompt.
    return ids if ids[: len(prompt)] == prompt else prompt + ids
