"""Perturbed copies of calibration audio: speed, additive noise, level.

A few dozen clean calibration clips cover few speaking rates, recording conditions and levels;
the statistics the solvers read (input Gram matrices) then describe only those. Each copy keeps
its clip's transcript, so teacher forcing is unchanged:

  speed  tempo and pitch scaled by a factor drawn from SPEED_FACTORS (resampling, as in Kaldi's
         speed perturbation): the clip plays f times faster and lasts 1/f as long
  noise  white Gaussian noise at a signal-to-noise ratio drawn uniformly in NOISE_SNR_DB
  level  gain drawn uniformly in LEVEL_DB, lowered where needed so the peak stays within [-1, 1]

Every draw comes from the numpy Generator passed in, so a calibration seed gives the same copies.
"""
from __future__ import annotations

import numpy as np

from fade_kernels.data.audio import TARGET_SR, resample

AUGMENTATIONS = ("speed", "noise", "level")
SPEED_FACTORS = (0.9, 1.1)
NOISE_SNR_DB = (10.0, 30.0)
LEVEL_DB = (-12.0, 6.0)


def parse_augmentations(text: str | None) -> tuple[str, ...]:
    """"speed,noise" -> ("speed", "noise"); None or "" -> (). Raises ValueError naming the
    unknown names and the known ones."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}")
    return names


def augment(audio: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One perturbed copy of `audio` float32 (n_samples,) at 16 kHz: `kind` one of AUGMENTATIONS.
    Returns float32 (n,), n = n_samples except for speed (about n_samples / factor)."""
    audio = np.asarray(audio, dtype=np.float32)
    if kind == "speed":
        factor = float(rng.choice(SPEED_FACTORS))
        # Read as if recorded at factor x 16 kHz and resampled to 16 kHz: f times faster.
        return resample(audio, int(round(TARGET_SR * factor)), TARGET_SR)
    if kind == "noise":
        snr_db = rng.uniform(*NOISE_SNR_DB)
        power = float(np.mean(audio.astype(np.float64) ** 2))
        noise = rng.standard_normal(audio.shape[0]) * np.sqrt(power / 10 ** (snr_db / 10))
        return (audio + noise).astype(np.float32)
    if kind == "level":
        gain = 10 ** (rng.uniform(*LEVEL_DB) / 20)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > 0:
            gain = min(gain, 1.0 / peak)
        return (audio * gain).astype(np.float32)
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
