"""Utterance lists from JSONL manifests or LibriSpeech-style folders, and seeded subsets.

Manifest format (one JSON object per line, blank lines ignored)::

    {"audio": "audio/piper/s001_ls1.00.wav", "text": "hello world", "id": "s001", "subset": "piper"}

`audio` is relative to the manifest's folder (or absolute); `text` may be omitted/null for
unlabelled calibration audio; `id` defaults to the audio path without its suffix; `subset`
defaults to "default"; an optional `duration` (seconds) is carried along.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

T = TypeVar("T")

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg")


@dataclass
class Utterance:
    """One audio file with its reference transcript.

    audio: absolute (resolved) path. text: reference, or None if unlabelled.
    subset: grouping key for per-subset WER (e.g. "piper", "espeak", "noisy", "test-clean").
    duration: seconds, if known (not computed here, to avoid opening every file).
    """

    id: str
    audio: Path
    text: str | None
    subset: str = "default"
    duration: float | None = None


def read_manifest(path: str | Path) -> list[Utterance]:
    """Parse a JSONL manifest into Utterances; audio paths are resolved and checked to exist.

    Raises FileNotFoundError if the manifest is missing, ValueError naming
    "<file>:<line>" and the problem for bad JSON, a missing/invalid `audio` field,
    a non-string `text`, a missing audio file, or a duplicated id.
    """
    mpath = Path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest not found: {mpath}")
    base = mpath.resolve().parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with open(mpath, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{mpath}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            audio = obj.get("audio")
            if not isinstance(audio, str) or not audio:
                raise ValueError(f"{where}: missing 'audio' field (a path string)")
            text = obj.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: 'text' must be a string or null")
            apath = Path(audio)
            if not apath.is_absolute():
                apath = base / apath
            if not apath.is_file():
                raise ValueError(f"{where}: audio file not found: {apath}")
            uid = obj.get("id")
            if uid is None:
                uid = str(Path(audio).with_suffix("")) if not Path(audio).is_absolute() else apath.stem
            uid = str(uid)
            if uid in seen:
                raise ValueError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
            seen[uid] = lineno
            duration = obj.get("duration")
            utts.append(
                Utterance(
                    id=uid,
                    audio=apath,
                    text=text,
                    subset=str(obj.get("subset") or "default"),
                    duration=float(duration) if duration is not None else None,
                )
            )
    return utts


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> None:
    """Write Utterances as JSONL, with audio paths relative to the manifest folder when possible
    (so the whole dev-set folder can be moved or copied)."""
    mpath = Path(path)
    base = mpath.resolve().parent
    mpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = mpath.with_suffix(mpath.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            d = asdict(u)
            ap = Path(u.audio).resolve()
            try:
                d["audio"] = ap.relative_to(base).as_posix()
            except ValueError:
                d["audio"] = str(ap)
            if d["duration"] is None:
                del d["duration"]
            else:
                d["duration"] = round(float(d["duration"]), 3)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    # Atomic replace so an interrupted run never leaves a half-written manifest.
    tmp.replace(mpath)


def _find_audio(folder: Path, uid: str) -> Path | None:
    for suf in AUDIO_SUFFIXES:
        p = folder / f"{uid}{suf}"
        if p.is_file():
            return p
    return None


def read_librispeech(folder: str | Path) -> list[Utterance]:
    """Read a LibriSpeech-style tree: `*.trans.txt` files with lines "UTT-ID TRANSCRIPT",
    the audio `UTT-ID.flac` (or .wav/.ogg) beside them.

    `folder` may be the LibriSpeech root (subsets test-clean/, dev-other/, ...) or one subset;
    `subset` is the name of the directory two levels above the transcript
    (LibriSpeech/<subset>/<speaker>/<chapter>/x.trans.txt), else `folder`'s name.
    Transcripts are kept as written (upper case); normalisation happens at scoring time.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech folder not found: {root}")
    root = root.resolve()
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ValueError(f"no *.trans.txt transcript files under {root} (not a LibriSpeech-style tree?)")
    utts: list[Utterance] = []
    for tf in trans_files:
        rel = tf.parent.relative_to(root)
        subset = rel.parts[-3] if len(rel.parts) >= 3 else root.name
        with open(tf, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                uid, _, text = line.partition(" ")
                audio = _find_audio(tf.parent, uid)
                if audio is None:
                    raise ValueError(f"{tf}:{lineno}: audio file not found for {uid!r} in {tf.parent}")
                utts.append(Utterance(id=uid, audio=audio, text=text.strip(), subset=subset))
    return utts


def load_corpus(path: str | Path) -> list[Utterance]:
    """A `.jsonl` file -> read_manifest; a directory -> read_librispeech; else ValueError."""
    p = Path(path)
    if p.is_dir():
        return read_librispeech(p)
    if p.suffix == ".jsonl":
        return read_manifest(p)  # raises FileNotFoundError if missing
    if not p.exists():
        raise FileNotFoundError(f"corpus not found: {p} (expected a .jsonl manifest or a LibriSpeech folder)")
    raise ValueError(f"unsupported corpus {p}: expected a .jsonl manifest or a LibriSpeech-style folder")


def select_subset(utterances: Sequence[T], n: int | None, seed: int = 0) -> list[T]:
    """Deterministic random choice of `n` items (all of them if n is None or n >= len).

    Items are ranked by SHA-1 of "seed:index", so the same (len, n, seed) picks the same
    positions on every platform and Python version (random.sample gives no such guarantee).
    The chosen items keep their corpus order so downstream batching does not depend on the
    sampling order.
    """
    items = list(utterances)
    if n is None or n >= len(items):
        return items
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).digest())
    return [items[i] for i in sorted(ranked[:n])]
