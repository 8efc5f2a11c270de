"""Calibration augmentation: each perturbation does what it says (measured on the output), copies
follow their clip (tokens, cross-fitting half), a seed gives the same copies, bad names are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fade_kernels.calib.augment import LEVEL_DB, NOISE_SNR_DB, SPEED_FACTORS, augment, parse_augmentations
from fade_kernels.calib.samples import CalibSample
from fade_kernels.pipeline.inputs import calibration_batches, cross_fitting_halves

from reliability.faults import error_line, quantize_args


def _rng(_fresh_seed) -> np.random.Generator:
    return np.random.default_rng(_fresh_seed)


def test_speed_scales_frequency_and_duration(_fresh_seed):
    sr, f0 = 16000, 440.0
    tone = np.sin(2 * np.pi * f0 * np.arange(sr) / sr).astype(np.float32)
    out = augment(tone, "speed", _rng(_fresh_seed))
    factor = len(tone) / len(out)
    assert any(abs(factor - f) < 1e-3 for f in SPEED_FACTORS), factor
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * sr / len(out)
    assert abs(peak_hz - f0 * factor) <= 2 * sr / len(out), (peak_hz, f0 * factor)
    assert out.dtype == np.float32


def test_noise_lands_in_the_snr_range(_fresh_seed):
    audio = (0.1 * np.random.default_rng(_fresh_seed).standard_normal(32000)).astype(np.float32)
    out = augment(audio, "noise", _rng(_fresh_seed + 1))
    noise = out.astype(np.float64) - audio
    snr_db = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2) / np.mean(noise ** 2))
    # 32000 noise samples: the measured power is within ~2% (0.1 dB) of the drawn one.
    assert NOISE_SNR_DB[0] - 0.2 <= snr_db <= NOISE_SNR_DB[1] + 0.2, snr_db


def test_level_is_a_gain_that_keeps_the_peak_in_range(_fresh_seed):
    audio = (0.9 * np.sin(np.linspace(0, 60, 8000))).astype(np.float32)
    out = augment(audio, "level", _rng(_fresh_seed))
    gain = float(np.dot(out, audio) / np.dot(audio, audio))
    np.testing.assert_allclose(out, gain * audio, rtol=0, atol=1e-6)
    gain_db = 20 * np.log10(gain)
    assert LEVEL_DB[0] - 1e-6 <= gain_db <= LEVEL_DB[1] + 1e-6 and np.max(np.abs(out)) <= 1 + 1e-6


def test_same_seed_same_copies_and_bad_names_refused():
    audio = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    for kind in ("speed", "noise", "level"):
        assert np.array_equal(augment(audio, kind, np.random.default_rng(5)), augment(audio, kind, np.random.default_rng(5)))
    assert parse_augmentations("noise, speed,noise") == ("noise", "speed")
    assert parse_augmentations(None) == ()
    with pytest.raises(ValueError, match="wobble"):
        parse_augmentations("speed,wobble")


def test_cross_fitting_halves_follow_the_source_utterance():
    ids = torch.tensor([1, 2, 3])
    sources = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    samples = [CalibSample(torch.zeros(1), 1, ids, source=s) for s in sources]
    halves = torch.cat(cross_fitting_halves(calibration_batches(samples, 4)))
    assert halves.tolist() == [s % 2 for s in sources]
    plain = [CalibSample(torch.zeros(1), 1, ids) for _ in range(5)]
    assert torch.cat(cross_fitting_halves(calibration_batches(plain, 2))).tolist() == [0, 1, 0, 1, 0]


def test_prepare_samples_adds_one_copy_per_kind(assets):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.data.corpus import load_corpus

    model = WhisperForConditionalGeneration.from_pretrained(assets["model"]).eval()
    processor = WhisperProcessor.from_pretrained(assets["model"])
    utterances = load_corpus(assets["calib"])[:3]
    kinds = ("speed", "noise", "level")
    samples = prepare_samples(model, processor, utterances, progress=False, augmentations=kinds, seed=7)
    plain = prepare_samples(model, processor, utterances, progress=False)
    assert len(samples) == 3 * (1 + len(kinds))
    for index, original in enumerate(plain):
        group = samples[index * 4:(index + 1) * 4]
        assert [s.source for s in group] == [index] * 4
        assert torch.equal(group[0].encoder_input, original.encoder_input)   # the clip itself comes first
        assert all(torch.equal(s.decoder_ids, original.decoder_ids) for s in group)
        assert all(not torch.equal(s.encoder_input, original.encoder_input) for s in group[1:])
        ratio = original.n_samples / group[1].n_samples                       # the speed copy
        assert any(abs(ratio - f) < 1e-3 for f in SPEED_FACTORS), ratio
    again = prepare_samples(model, processor, utterances, progress=False, augmentations=kinds, seed=7)
    assert all(torch.equal(a.encoder_input, b.encoder_input) for a, b in zip(samples, again))


def test_quantize_refuses_an_unknown_augmentation(assets, tmp_path, fade):
    code, _, err = fade(*quantize_args(assets, tmp_path / "q", "--augment", "speed,echo"))
    assert code == 2
    line = error_line(err)
    assert "--augment" in line and "echo" in line and "speed, noise, level" in line
    assert not (tmp_path / "q").exists()


def test_fade_quantize_with_augmented_calibration(assets, tmp_path, fade):
    args = quantize_args(assets, tmp_path / "q", "--augment", "speed,noise,level")
    args[args.index("rtn")] = "fade"
    code, out, err = fade(*args)
    assert code == 0, err
    assert (tmp_path / "q" / "model.safetensors").is_file()
