"""collect_real_speech: the real recordings' split shares no speaker and no transcript between
calibration and evaluation, and the written audio is the source resampled to 16 kHz."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "python" / "collect_real_speech.py"


@pytest.fixture(scope="module")
def crs():
    # python/ is not a package: load the script as a module by path.
    spec = importlib.util.spec_from_file_location("collect_real_speech", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["collect_real_speech"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_plan_is_disjoint_by_speaker_and_sentence(crs):
    entries = crs.plan_fsdd({"calib": 3, "eval": 4})
    calib = [e for e in entries if e["split"] == "calib"]
    evals = [e for e in entries if e["split"] == "eval"]
    assert len(calib) == 3 * 5 * 3 and len(evals) == 3 * 5 * 4
    assert not {e["speaker"] for e in calib} & {e["speaker"] for e in evals}
    assert not {e["text"] for e in calib} & {e["text"] for e in evals}
    assert len({e["id"] for e in entries}) == len(entries)
    crs.check_disjoint(entries)
    leaked = entries + [dict(evals[0], split="calib")]
    with pytest.raises(ValueError, match="in both calibration and evaluation"):
        crs.check_disjoint(leaked)


def test_written_audio_is_resampled_source(crs, tmp_path):
    import soundfile as sf

    repo = tmp_path / "fsdd"
    (repo / "recordings").mkdir(parents=True)
    entries = crs.plan_fsdd({"calib": 1, "eval": 1})
    rng = np.random.default_rng()
    sources = {}
    for e in entries:
        audio = (0.3 * np.sin(np.arange(4000) * rng.uniform(0.05, 0.3))).astype(np.float32)
        sf.write(str(repo / e["repo_path"]), audio, 8000, subtype="FLOAT")
        sources[e["id"]] = audio
    rows = crs.write_fsdd(crs.RepoReader(repo), entries, tmp_path / "out")
    assert [r["id"] for r in rows] == [e["id"] for e in entries]
    for r in rows:
        data, sr = sf.read(str(tmp_path / "out" / r["audio"]), dtype="float32")
        assert sr == 16000 and data.shape == (8000,) and r["duration"] == 0.5
        # Every second output sample sits on an input sample: equal up to the FIR's ripple and
        # the 16-bit quantization of the WAV (2^-15).
        mid = slice(200, 3800)
        assert np.abs(data[::2][mid] - sources[r["id"]][mid]).max() < 0.02


def test_bounded_eval_takes_both_sources(crs):
    rows = [{"id": f"s{i}", "source": "synthetic"} for i in range(10)] + \
           [{"id": f"r{i}", "source": "fsdd"} for i in range(10)]
    picked = crs.bounded_eval(rows, 3, 4)
    assert [r["source"] for r in picked] == ["synthetic"] * 3 + ["fsdd"] * 4
    assert picked == crs.bounded_eval(list(reversed(rows)), 3, 4)
    assert json.dumps(picked)
