"""real_sentences: silence segmentation finds the sentences of a recording, the planned split
shares no speaker, transcript or Harvard list between calibration and evaluation, and the
writer cuts, resamples and pairs each sentence with its text. No real audio is needed."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


@pytest.fixture(scope="module")
def rs():
    # python/ is not a package: load the modules by path (real_sentences imports collect_real_speech).
    sys.path.insert(0, str(PYTHON_DIR))
    for name in ("collect_real_speech", "real_sentences"):
        spec = importlib.util.spec_from_file_location(name, PYTHON_DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["real_sentences"]


def tones_and_pauses(rng, sr, n, noise=1e-3):
    """n tone bursts (1-3 s, varying level) separated by pauses (0.5-1.5 s) over weak noise;
    returns float32 audio and the bursts' true (start, end) sample ranges."""
    pieces, truth, t = [rng.normal(0, noise, int(sr * rng.uniform(0.3, 1.0)))], [], 0
    t = len(pieces[0])
    for _ in range(n):
        length = int(sr * rng.uniform(1.0, 3.0))
        freq = rng.uniform(150, 1500)
        # A syllable-like envelope with short dips inside the burst, which must not split it.
        env = 0.5 + 0.5 * np.abs(np.sin(np.pi * np.arange(length) / sr * rng.uniform(3, 6)))
        burst = rng.uniform(0.05, 0.5) * env * np.sin(2 * np.pi * freq * np.arange(length) / sr)
        pieces.append(burst + rng.normal(0, noise, length))
        truth.append((t, t + length))
        t += length
        gap = rng.normal(0, noise, int(sr * rng.uniform(0.5, 1.5)))
        pieces.append(gap)
        t += len(gap)
    return np.concatenate(pieces).astype(np.float32), truth


@pytest.mark.parametrize("sr", [8000, 16000])
def test_segmentation_finds_every_burst(rs, sr):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    audio, truth = tones_and_pauses(rng, sr, n)
    segments = rs.segment_by_silence(audio, sr, n)
    assert segments is not None, f"seed {seed}"
    assert len(segments) == n, f"seed {seed}"
    tol = int(0.25 * sr)  # padding of 0.2 s plus a 20 ms frame
    for (s, e), (ts, te) in zip(segments, truth):
        assert s <= ts + int(0.02 * sr) and e >= te - int(0.02 * sr), f"seed {seed}: {(s, e)} misses {(ts, te)}"
        assert ts - s <= tol and e - te <= tol, f"seed {seed}: {(s, e)} too wide for {(ts, te)}"
    # Segments never overlap.
    assert all(a[1] <= b[0] for a, b in zip(segments, segments[1:])), f"seed {seed}"


def test_segmentation_refuses_a_wrong_count(rs):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    audio, _ = tones_and_pauses(rng, 8000, 5)
    assert rs.segment_by_silence(audio, 8000, 9) is None, f"seed {seed}"
    # Constant noise has no pauses at all.
    assert rs.segment_by_silence(rng.normal(0, 0.1, 80000).astype(np.float32), 8000, 3) is None


def test_plausible_durations(rs):
    sr = 8000
    texts = ["one two three four five", "six seven eight nine ten"]
    assert rs.plausible_durations([(0, int(2.0 * sr)), (3 * sr, 5 * sr)], sr, texts)
    # A 0.3 s segment cannot hold five words; a 6 s one is two sentences.
    assert not rs.plausible_durations([(0, int(0.3 * sr)), (3 * sr, 5 * sr)], sr, texts)
    assert not rs.plausible_durations([(0, 6 * sr), (7 * sr, 9 * sr)], sr, texts)


def test_plan_is_disjoint_by_speaker_sentence_and_list(rs):
    lists = {n: [f"list {n} sentence {i}" for i in range(10)] for n in range(1, 73)}
    files = [f for f in rs.OSR_FILES if f["list"] is not None]
    entries = rs.plan_sentences(lists)
    osr = [e for e in entries if e["source"] == "osr-harvard"]
    assert len(osr) == 10 * len(files)
    assert len({e["id"] for e in entries}) == len(entries)
    assert [e["split"] for e in entries] == sorted((e["split"] for e in entries), key=lambda s: s != "calib")
    rs.check_sentence_split(entries)
    # Each OSR file's sentences are its list's, in order.
    for f in files:
        got = [e["text"] for e in osr if e["repo_path"] == f["path"]]
        assert got == lists[f["list"]]
    calib = [e for e in entries if e["split"] == "calib"]
    evals = [e for e in entries if e["split"] == "eval"]
    assert calib and evals
    for leak in (dict(evals[0], split="calib"),
                 dict(calib[0], speaker=evals[0]["speaker"]),
                 dict(calib[0], text=evals[0]["text"], speaker="someone else")):
        with pytest.raises(ValueError, match="in both calibration and evaluation"):
            rs.check_sentence_split(entries + [leak])
    if any(e.get("harvard_list") for e in evals):
        listed = next(e for e in evals if e.get("harvard_list"))
        leak = dict(listed, split="calib", speaker="new", text="new", id="x")
        with pytest.raises(ValueError, match="harvard_list in both"):
            rs.check_sentence_split(entries + [leak])


def test_harvard_file_has_ten_sentences_per_list(rs):
    lists = rs.harvard_lists()
    assert lists and all(len(v) == 10 for v in lists.values())
    for f in rs.OSR_FILES:
        if f["list"] is not None:
            assert f["list"] in lists


def test_writer_cuts_pairs_and_resamples(rs, tmp_path):
    import soundfile as sf

    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    sr = 8000
    audio, truth = tones_and_pauses(rng, sr, 3)
    # Bursts of 1-3 s plus up to 0.4 s of padding, read as 4-word sentences: 0.25-0.85 s a
    # word, inside the plausibility check.
    texts = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu"]
    sf.write(str(repo / "osr.wav"), audio, sr, subtype="FLOAT")
    entries = [{
        "id": f"t-{i}", "audio": f"audio/real/t-{i}.wav", "text": texts[i], "subset": "real",
        "source": "osr-harvard", "speaker": "s", "split": "eval", "condition": "c", "harvard_list": 99,
        "repo": "o/r", "repo_path": "osr.wav", "segment": i} for i in range(3)]
    reader = sys.modules["collect_real_speech"].RepoReader(repo, option="--snapshot o/r", marker=".git")
    rows, skipped = rs.write_sentences({"o/r": reader}, entries, tmp_path / "out")
    assert skipped == [] and [r["text"] for r in rows] == texts, f"seed {seed}"
    for r, (ts, te) in zip(rows, truth):
        assert set(r) >= {"id", "audio", "text", "speaker", "split", "duration"} and "repo_path" not in r
        data, out_sr = sf.read(str(tmp_path / "out" / r["audio"]), dtype="float32")
        assert out_sr == 16000
        # The cut covers the burst and at most 0.25 s more on each side.
        assert (te - ts) / sr <= r["duration"] <= (te - ts) / sr + 0.5 + 1e-3, f"seed {seed}"
    # A rerun keeps the written audio (resumes) and gives the same rows.
    again, _ = rs.write_sentences({"o/r": reader}, entries, tmp_path / "out")
    assert again == rows


def test_cli_names_every_missing_snapshot(rs, tmp_path, capsys):
    crs = sys.modules["collect_real_speech"]
    given = next(iter(rs.SENTENCE_REPOS))
    with pytest.raises(SystemExit):
        crs.main(["--out", str(tmp_path / "out"), "--snapshot", f"{given}={tmp_path}"])
    err = capsys.readouterr().err
    for repo, info in rs.SENTENCE_REPOS.items():
        if repo != given:
            assert repo in err and info["commit"] in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        crs.main(["--out", str(tmp_path / "out")])
    assert "--fsdd" in capsys.readouterr().err


def test_reserved_recordings_are_refused(rs):
    lists = {n: [f"list {n} sentence {i}" for i in range(10)] for n in range(1, 73)}
    entries = rs.plan_sentences(lists)
    rs.check_not_reserved(entries)
    assert not {f["list"] for f in rs.OSR_FILES} & rs.RESERVED_HARVARD_LISTS
    base = dict(entries[0], harvard_list=None)
    for bad in (dict(base, harvard_list=sorted(rs.RESERVED_HARVARD_LISTS)[0]),
                dict(base, text="And so, my fellow Americans: ask not what your country can do for you"),
                dict(base, id="LJ001-0001")):
        with pytest.raises(ValueError, match="reserved"):
            rs.check_not_reserved(entries + [bad])
