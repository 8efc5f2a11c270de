"""Audio file loading for ASR evaluation and calibration."""
from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

#: Whisper (and Moonshine) feature extractors expect 16 kHz input.
TARGET_SR = 16000


class AudioFileError(RuntimeError, ValueError):
    """An audio file that cannot be used: unreadable, or empty. A ValueError (bad input) and, as
    before, a RuntimeError."""


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """Resample a 1-D signal with a polyphase filter.

    audio: float array, shape (n_samples,). Returns float32, shape ~(n_samples * target/orig,).
    resample_poly (not FFT resampling) because it applies a proper anti-aliasing FIR and
    does not assume the signal is periodic, so clip edges do not ring.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} -> {target_sr}")
    from scipy.signal import resample_poly

    g = gcd(int(orig_sr), int(target_sr))
    out = resample_poly(audio, int(target_sr) // g, int(orig_sr) // g)
    return out.astype(np.float32, copy=False)


def load_audio(path: str | Path, sampling_rate: int = TARGET_SR) -> np.ndarray:
    """Read an audio file (wav/flac/ogg, anything libsndfile reads) as mono float32.

    Returns shape (n_samples,), dtype float32, values nominally in [-1, 1], at
    `sampling_rate` Hz. Multi-channel input is averaged to mono; other rates are resampled.
    Raises FileNotFoundError, or AudioFileError naming `path` for a file libsndfile cannot read or
    one that holds no samples, so a bad manifest entry is easy to find.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"audio file not found: {p}")
    try:
        # always_2d gives (frames, channels) for mono and multi-channel alike.
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError subclasses
        raise AudioFileError(f"cannot read audio file {p}: {e}") from e
    if data.shape[0] == 0:
        raise AudioFileError(f"audio file {p} holds no samples (0 s of audio): remove it or record it again")
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(audio, sr, sampling_rate)
