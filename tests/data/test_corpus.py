"""Manifests, LibriSpeech trees, seeded subsets and audio loading/resampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fade_kernels.data import (
    Utterance,
    load_audio,
    load_corpus,
    read_librispeech,
    read_manifest,
    select_subset,
    write_manifest,
)


def _wav(path: Path, seconds: float = 0.1, sr: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.zeros((int(seconds * sr), channels), dtype=np.float32)
    sf.write(str(path), x, sr)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_manifest_relative_and_absolute_paths(tmp_path):
    _wav(tmp_path / "audio" / "a.wav")
    abs_b = _wav(tmp_path / "elsewhere" / "b.flac").resolve()
    m = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "audio/a.wav", "text": "Hello there"},
            "",  # blank lines are ignored
            {"audio": str(abs_b), "text": None, "id": "bee", "subset": "noisy", "duration": 0.1},
        ],
    )
    utts = read_manifest(m)
    assert [u.id for u in utts] == ["audio/a", "bee"]
    assert utts[0].audio == (tmp_path / "audio" / "a.wav").resolve()
    assert utts[0].text == "Hello there" and utts[0].subset == "default"
    assert utts[1].audio == abs_b and utts[1].text is None
    assert utts[1].subset == "noisy" and utts[1].duration == pytest.approx(0.1)
    assert load_corpus(m) == utts


def test_manifest_round_trip(tmp_path):
    a = _wav(tmp_path / "d" / "audio" / "x.wav").resolve()
    utts = [Utterance("x", a, "some text", "piper", 0.1)]
    write_manifest(utts, tmp_path / "d" / "m.jsonl")
    line = json.loads((tmp_path / "d" / "m.jsonl").read_text())
    assert line["audio"] == "audio/x.wav"  # relative: the folder can be moved
    assert read_manifest(tmp_path / "d" / "m.jsonl") == utts


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", r"m\.jsonl:2: bad JSON"),
        ({"text": "no audio"}, r"m\.jsonl:2: missing 'audio'"),
        ({"audio": "missing.wav", "text": "x"}, r"m\.jsonl:2: audio file not found: .*missing\.wav"),
        ({"audio": "ok.wav", "text": "dup", "id": "ok"}, r"m\.jsonl:2: duplicate id 'ok'"),
        ({"audio": "ok.wav", "text": 3, "id": "z"}, r"m\.jsonl:2: 'text' must be"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, row, message):
    _wav(tmp_path / "ok.wav")
    m = _jsonl(tmp_path / "m.jsonl", [{"audio": "ok.wav", "text": "fine", "id": "ok"}, row])
    with pytest.raises(ValueError, match=message):
        read_manifest(m)


def test_missing_manifest_and_bad_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported corpus .*x\.csv"):
        load_corpus(tmp_path / "x.csv")


def _librispeech(root: Path) -> Path:
    sub = root / "LibriSpeech" / "test-clean"
    for spk, chap, n in (("19", "198", 2), ("26", "495", 1)):
        d = sub / spk / chap
        lines = []
        for k in range(n):
            uid = f"{spk}-{chap}-{k:04d}"
            _wav(d / f"{uid}.flac")
            lines.append(f"{uid} WORDS OF UTTERANCE {k}")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


def test_librispeech_tree(tmp_path):
    root = _librispeech(tmp_path)
    utts = read_librispeech(root)
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert utts[1].text == "WORDS OF UTTERANCE 1"
    assert all(u.subset == "test-clean" and u.audio.suffix == ".flac" and u.audio.is_file() for u in utts)
    # Pointing at the subset folder itself gives the same subset name; load_corpus dispatches.
    assert [u.subset for u in load_corpus(root / "test-clean")] == ["test-clean"] * 3
    assert load_corpus(root) == utts


def test_librispeech_errors(tmp_path):
    with pytest.raises(ValueError, match="no \\*.trans.txt"):
        read_librispeech(tmp_path)
    root = _librispeech(tmp_path)
    (root / "test-clean" / "26" / "495" / "26-495-0000.flac").unlink()
    with pytest.raises(ValueError, match=r"26-495\.trans\.txt:1: audio file not found for '26-495-0000'"):
        read_librispeech(root)


def test_select_subset_deterministic_and_seeded():
    items = list(range(100))
    a = select_subset(items, 10, seed=1)
    assert a == select_subset(items, 10, seed=1)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)  # corpus order kept
    assert a != select_subset(items, 10, seed=2)
    assert select_subset(items, 1000, seed=0) == items
    assert select_subset(items, None) == items
    assert select_subset(items, 0) == []


def test_load_audio_downmix_and_resample_preserves_frequency(tmp_path):
    sr_in, f0, secs = 44100, 440.0, 1.0
    t = np.arange(int(sr_in * secs)) / sr_in
    tone = 0.5 * np.sin(2 * np.pi * f0 * t)
    # Stereo with the tone in one channel: downmix halves the amplitude.
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    p = tmp_path / "tone.wav"
    sf.write(str(p), stereo, sr_in, subtype="FLOAT")
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 1
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak_hz = np.argmax(spec) * 16000 / len(x)
    assert abs(peak_hz - f0) <= 2.0
    assert np.max(np.abs(x[1000:-1000])) == pytest.approx(0.25, abs=0.01)
    # Already at the target rate: returned unchanged.
    q = tmp_path / "mono.flac"
    sf.write(str(q), tone[:16000].astype(np.float32), 16000)
    assert np.allclose(load_audio(q, sampling_rate=16000), tone[:16000], atol=1e-4)


def test_load_audio_errors_name_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"audio file not found: .*nope\.wav"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(RuntimeError, match=r"cannot read audio file .*bad\.wav"):
        load_audio(bad)
