"""Real read SENTENCES with transcripts for the dev set, from speech files that public
repositories ship as test data. Used by python/collect_real_speech.py (`--snapshot`).

Two kinds of source:

* Open Speech Repository (OSR) recordings of the Harvard sentences (IEEE 1969 lists, public
  domain text): each `OSR_us_000_NNNN_8k.wav` holds one speaker reading one list of 10
  sentences over a telephone-band (8 kHz) channel. `segment_by_silence` cuts a file into its
  sentences; a file is used only if exactly 10 segments of plausible length come out, and
  segment i is paired with sentence i of the list.
* Single utterances of corpora with their own transcripts (LibriSpeech), copied into test
  folders together with the corpus' transcript line.

Every file is read from a copy of the repository that ships it (a checkout or a bare git
directory, see `RepoReader`), pinned by commit in `SENTENCE_REPOS`. The split is by speaker AND
by sentence: each speaker (and, for OSR, each file with its whole Harvard list) is assigned to
one side in the tables below; `check_sentence_split` verifies that no speaker, transcript or
Harvard list is on both sides.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HARVARD_FILE = HERE / "harvard_sentences.txt"

# Repositories read, the commit their files were taken from, and their licences.
SENTENCE_REPOS = {
    "VishvPatel007/trackle.io": {"commit": "be02ebd6b952b601a8285463125b08640d51b043", "license": "none stated"},
    "thalesaguiar21/PySpeech": {"commit": "d5cdda7f399e532324a88548b7845852413aed40", "license": "GPL-3.0"},
    "naren200/speech-llm-speech": {"commit": "8fede995fc05d0fdf3c60eb0c2b6ee9b54494c23", "license": "none stated"},
    "BravenMo/narrative-creation": {"commit": "238c5a1264f77e13fab536be404f3d472fdb9af2", "license": "MIT"},
    "SuperKogito/pydiogment": {"commit": "074543dc9483b450653f8a00c8279bf1eb873199", "license": "BSD-3-Clause"},
    "joinly-ai/joinly": {"commit": "59472ff1bb6d74aea210537cfb7f8679732cd08a", "license": "MIT"},
    "lingeshwaran4/AudioSimilarityProject": {"commit": "6761ad34f89c0427858526e71dd09874fe2e696e", "license": "none stated"},
    "Agrover112/Goodness-of-Pronunciation-Pipelines-for-OOV-Problem": {
        "commit": "6f6a660e13139778546ad59f3cc530edcf406a76", "license": "none stated"},
    "lhotse-speech/lhotse": {"commit": "a79cc864e4275f6342bb94261313526a14d385fb", "license": "Apache-2.0"},
}
OSR_LICENSE = ("Open Speech Repository: published for use with each speaker's signed release; "
               "no licence text. Harvard sentence text: public domain (IEEE 1969)")
LIBRISPEECH_LICENSE = "CC BY 4.0 (LibriSpeech, Panayotov et al. 2015)"

# OSR files: repository, path, Harvard list, speaker group, side. OSR does not name its
# speakers; neighbouring file numbers may be one speaker, so every file of one number block
# ("osr-003x") carries the same speaker label and goes to the same side.
OSR_FILES = (
    {"osr": "0010", "repo": "VishvPatel007/trackle.io", "path": "OSR_us_000_0010_8k.wav",
     "list": 1, "speaker": "osr-001x", "split": "calib"},
    {"osr": "0011", "repo": "thalesaguiar21/PySpeech", "path": "tests/voice/OSR_us_000_0011_8k.wav",
     "list": 2, "speaker": "osr-001x", "split": "calib"},
    {"osr": "0012", "repo": "thalesaguiar21/PySpeech", "path": "tests/voice/OSR_us_000_0012_8k.wav",
     "list": 3, "speaker": "osr-001x", "split": "calib"},
    {"osr": "0017", "repo": "naren200/speech-llm-speech", "path": "whisper_asr/samples/OSR_us_000_0017_8k.wav",
     "list": 3, "speaker": "osr-001x", "split": "calib"},
    {"osr": "0034", "repo": "joinly-ai/joinly", "path": "tests/data/speech_audio/OSR_us_000_0034_8k.wav",
     "list": 72, "speaker": "osr-003x", "split": "eval"},
    {"osr": "0035", "repo": "lingeshwaran4/AudioSimilarityProject", "path": "OSR_us_000_0035_8k.wav",
     "list": 42, "speaker": "osr-003x", "split": "eval"},
    {"osr": "0036", "repo": "lingeshwaran4/AudioSimilarityProject", "path": "OSR_us_000_0036_8k.wav",
     "list": 31, "speaker": "osr-003x", "split": "eval"},
    {"osr": "0038", "repo": "naren200/speech-llm-speech", "path": "whisper_asr/samples/OSR_us_000_0038_8k.wav",
     "list": 33, "speaker": "osr-003x", "split": "eval"},
    {"osr": "0060", "repo": "SuperKogito/pydiogment", "path": "tests/testfiles/test.wav",
     "list": 28, "speaker": "osr-006x", "split": "eval"},
    {"osr": "0061", "repo": "BravenMo/narrative-creation", "path": "resources/OSR_us_000_0061_8k.wav",
     "list": 30, "speaker": "osr-006x", "split": "eval"},
)

# Single LibriSpeech utterances: repository, audio path, transcript file in that repository
# (LibriSpeech `<id> TRANSCRIPT` lines, optional id prefix), speaker, side.
LIBRISPEECH_FILES = (
    {"uid": "1272-128104-0000", "repo": "Agrover112/Goodness-of-Pronunciation-Pipelines-for-OOV-Problem",
     "path": "wav/1272-128104-0000.flac", "transcripts": "wav/1272-128104.trans.txt", "split": "eval"},
    {"uid": "1272-128104-0001", "repo": "Agrover112/Goodness-of-Pronunciation-Pipelines-for-OOV-Problem",
     "path": "wav/1272-128104-0001.flac", "transcripts": "wav/1272-128104.trans.txt", "split": "eval"},
    {"uid": "8266-258262-0000", "repo": "Agrover112/Goodness-of-Pronunciation-Pipelines-for-OOV-Problem",
     "path": "wav/8266-258262-0000.flac", "transcripts": "wav/1272-128104.trans.txt", "split": "calib"},
    {"uid": "8266-258262-0001", "repo": "Agrover112/Goodness-of-Pronunciation-Pipelines-for-OOV-Problem",
     "path": "wav/8266-258262-0001.flac", "transcripts": "wav/1272-128104.trans.txt", "split": "calib"},
    {"uid": "2412-153948-0000", "repo": "lhotse-speech/lhotse",
     "path": "test/fixtures/mix_cut_test/audio/storage/2412-153948-0000.flac",
     "transcripts": "test/fixtures/mini_librispeech/text", "prefix": "lbi-", "split": "calib"},
)


def harvard_lists(path: Path = HARVARD_FILE) -> dict[int, list[str]]:
    """{list number: its 10 sentences} from a `LIST<TAB>INDEX<TAB>SENTENCE` file."""
    lists: dict[int, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            number, index, sentence = line.split("\t")
            lists.setdefault(int(number), []).append(sentence)
            if len(lists[int(number)]) != int(index):
                raise ValueError(f"{path}: list {number} sentence {index} out of order")
    return lists


def frame_levels_db(audio: np.ndarray, sr: int, frame_s: float = 0.02) -> np.ndarray:
    """RMS level in dB of consecutive non-overlapping frames of `frame_s` seconds.

    audio: float (n,) mono samples. Returns float64 (n // frame,)."""
    hop = max(1, int(round(frame_s * sr)))
    n = len(audio) // hop
    frames = np.asarray(audio[: n * hop], dtype=np.float64).reshape(n, hop)
    return 10.0 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)


def _regions(voiced: np.ndarray, min_gap: int, min_len: int) -> list[tuple[int, int]]:
    """Runs of True frames, runs closer than min_gap frames merged, runs shorter than min_len dropped."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], voiced.astype(np.int8), [0]))))
    runs = list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
    merged: list[list[int]] = []
    for start, end in runs:
        if merged and start - merged[-1][1] < min_gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged if e - s >= min_len]


def segment_by_silence(audio: np.ndarray, sr: int, n_expected: int, *, frame_s: float = 0.02,
                       min_speech_s: float = 0.8, pad_s: float = 0.2) -> list[tuple[int, int]] | None:
    """Cut a recording of `n_expected` sentences separated by pauses into sample ranges.

    Frames louder than a threshold between the noise floor (10th percentile of frame levels)
    and the speech level (95th percentile) are speech; runs of speech closer than a minimum
    pause are one sentence. Thresholds (20-50 % of the floor-to-speech range) and minimum
    pauses (0.25-1.0 s) are tried on a grid; the answer is the segmentation that the most grid
    points agree on among those giving exactly `n_expected` segments, so a single lucky setting
    does not decide. Returns None when no setting gives `n_expected` segments.

    audio: float (n,) mono. Returns [(start, end)] sample indices, padded by `pad_s` (never
    beyond half the pause to a neighbour), in time order.
    """
    levels = frame_levels_db(audio, sr, frame_s)
    if len(levels) == 0:
        return None
    floor, speech = np.percentile(levels, 10), np.percentile(levels, 95)
    if speech - floor < 10.0:  # no pauses clearly quieter than speech
        return None
    votes: dict[tuple, int] = {}
    min_len = int(round(min_speech_s / frame_s))
    for frac in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        voiced = levels > floor + frac * (speech - floor)
        for gap_s in (0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
            regions = _regions(voiced, int(round(gap_s / frame_s)), min_len)
            if len(regions) == n_expected:
                # Agreement is judged on boundaries rounded to 0.2 s.
                key = tuple((round(s * frame_s / 0.2), round(e * frame_s / 0.2)) for s, e in regions)
                votes.setdefault(key, 0)
                votes[key] += 1
                votes.setdefault(("regions", key), regions)  # first regions seen for that key
    keys = [k for k in votes if k and k[0] != "regions"]
    if not keys:
        return None
    best = max(keys, key=lambda k: votes[k])
    regions = votes[("regions", best)]
    hop = int(round(frame_s * sr))
    pad = int(round(pad_s / frame_s))
    out = []
    for i, (s, e) in enumerate(regions):
        lo = s - pad if i == 0 else max(s - pad, (regions[i - 1][1] + s) // 2)
        hi = e + pad if i == len(regions) - 1 else min(e + pad, (e + regions[i + 1][0]) // 2)
        out.append((max(0, lo) * hop, min(len(audio), hi * hop)))
    return out


def plausible_durations(segments: list[tuple[int, int]], sr: int, texts: list[str]) -> bool:
    """True if every segment lasts 0.15-0.9 s per word of its sentence (read speech runs at
    about 0.3-0.5 s per word), so a sentence split in two and two sentences merged elsewhere do
    not pass as a 10-segment file."""
    for (s, e), text in zip(segments, texts):
        per_word = (e - s) / sr / max(1, len(text.split()))
        if not 0.15 <= per_word <= 0.9:
            return False
    return True


def plan_sentences(lists: dict[int, list[str]] | None = None) -> list[dict]:
    """Manifest entries (audio not yet written) of every sentence source, calib then eval.

    Each entry: id, audio (relative path), text, subset "real", source, speaker, split,
    condition, plus bookkeeping keys (repo, repo_path, and for OSR the Harvard list and the
    sentence's index in the file) that `write_sentences` drops."""
    lists = harvard_lists() if lists is None else lists
    entries = []
    for f in OSR_FILES:
        if f["list"] is None:
            continue
        for i, text in enumerate(lists[f["list"]]):
            uid = f"osr-{f['osr']}-{i + 1:02d}"
            entries.append({
                "id": uid, "audio": f"audio/real/{uid}.wav", "text": text, "subset": "real",
                "source": "osr-harvard", "speaker": f["speaker"], "split": f["split"],
                "condition": "telephone-band 8 kHz, read", "harvard_list": f["list"],
                "repo": f["repo"], "repo_path": f["path"], "segment": i,
            })
    for f in LIBRISPEECH_FILES:
        uid = f"librispeech-{f['uid']}"
        entries.append({
            "id": uid, "audio": f"audio/real/{uid}.wav", "text": None, "subset": "real",
            "source": "librispeech", "speaker": f"librispeech-{f['uid'].split('-')[0]}", "split": f["split"],
            "condition": "audiobook, 16 kHz", "repo": f["repo"], "repo_path": f["path"],
            "transcripts": f["transcripts"], "prefix": f.get("prefix", ""), "utt": f["uid"],
        })
    entries.sort(key=lambda e: e["split"] != "calib")
    return entries


# Content of recordings reserved for independent checks, which the dev set must not contain in
# any copy: the Harvard lists that SpeechBrain's test samples read (lists 4, 17, 18, 26, 27, 61,
# 64), the JFK inaugural clip, and LJSpeech (ids "LJnnn-nnnn").
RESERVED_HARVARD_LISTS = frozenset({4, 17, 18, 26, 27, 61, 64})
RESERVED_PHRASES = ("ask not what your country can do for you",)


def _normalized(text: str) -> str:
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def check_not_reserved(entries: list[dict]) -> None:
    """Raise ValueError if an entry reads a reserved Harvard list, contains a reserved phrase or
    is an LJSpeech clip (see RESERVED_HARVARD_LISTS)."""
    for e in entries:
        if e.get("harvard_list") in RESERVED_HARVARD_LISTS:
            raise ValueError(f"{e['id']}: Harvard list {e['harvard_list']} is reserved for independent checks")
        text = _normalized(e.get("text") or "")
        if any(phrase in text for phrase in RESERVED_PHRASES) or e["id"].upper().startswith("LJ"):
            raise ValueError(f"{e['id']}: a recording reserved for independent checks")


def check_sentence_split(entries: list[dict]) -> None:
    """Raise ValueError if a speaker, a transcript or a Harvard list is on both sides."""
    for key in ("speaker", "text", "harvard_list"):
        calib = {e[key] for e in entries if e["split"] == "calib" and e.get(key) is not None}
        evals = {e[key] for e in entries if e["split"] == "eval" and e.get(key) is not None}
        if calib & evals:
            raise ValueError(f"{key} in both calibration and evaluation parts: {sorted(calib & evals)}")


def _transcript(reader, path: str, utt: str, prefix: str) -> str:
    for line in reader.read(path).decode("utf-8").splitlines():
        head, _, text = line.strip().partition(" ")
        if head == prefix + utt:
            return text.strip()
    raise ValueError(f"{utt}: no transcript line in {path}")


def write_sentences(readers: dict, entries: list[dict], out: Path) -> tuple[list[dict], list[str]]:
    """Cut, resample to 16 kHz and write each planned sentence under `out`.

    readers: {repository: RepoReader}. Returns (manifest rows without bookkeeping keys, with
    `duration` in seconds; list of OSR files skipped because segmentation failed). Audio that
    already exists is kept, so a rerun resumes."""
    import soundfile as sf

    sys.path[:0] = [str(HERE.parent), str(HERE)]  # the package, and the sibling script
    from fade_kernels.data.audio import resample

    from collect_real_speech import TARGET_SR, _write_wav_atomic

    (out / "audio" / "real").mkdir(parents=True, exist_ok=True)
    cache: dict[tuple, tuple] = {}
    rows, skipped = [], []
    for e in entries:
        e = dict(e)
        dst = out / e["audio"]
        if e["source"] == "librispeech":
            e["text"] = _transcript(readers[e["repo"]], e["transcripts"], e["utt"], e["prefix"])
        if not dst.is_file():
            key = (e["repo"], e["repo_path"])
            if key not in cache:
                data, sr = sf.read(io.BytesIO(readers[e["repo"]].read(e["repo_path"])), dtype="float32", always_2d=True)
                cache.clear()
                cache[key] = (data.mean(axis=1), sr)
            audio, sr = cache[key]
            if e["source"] == "osr-harvard":
                texts = [x["text"] for x in entries if x.get("repo_path") == e["repo_path"]]
                segments = segment_by_silence(audio, sr, len(texts))
                if segments is None or not plausible_durations(segments, sr, texts):
                    if e["repo_path"] not in skipped:
                        skipped.append(e["repo_path"])
                    continue
                s, t = segments[e["segment"]]
                audio = audio[s:t]
            _write_wav_atomic(dst, resample(audio, sr, TARGET_SR), TARGET_SR)
        row = {k: v for k, v in e.items()
               if k not in ("repo", "repo_path", "segment", "transcripts", "prefix", "utt")}
        row["duration"] = round(sf.info(str(dst)).duration, 3)
        rows.append(row)
    return rows, skipped


def sources_summary() -> dict:
    """Repositories, commits and licences of the sentence sources, for real-summary.json."""
    return {
        "repositories": SENTENCE_REPOS,
        "osr_files": [{k: f[k] for k in ("osr", "repo", "path", "list", "speaker", "split")} for f in OSR_FILES],
        "librispeech_files": [{k: f[k] for k in ("uid", "repo", "path", "split")} for f in LIBRISPEECH_FILES],
        "licenses": {"osr-harvard": OSR_LICENSE, "librispeech": LIBRISPEECH_LICENSE},
    }
