#!/usr/bin/env python
"""Build the real-speech part of the dev set and merge it with the synthetic dev set.

    python python/collect_real_speech.py --fsdd FSDD --synthetic SYNTH --out OUT
    python python/collect_real_speech.py --snapshot OWNER/NAME=PATH [...] --synthetic SYNTH --out OUT

`--snapshot` adds real read SENTENCES (python/real_sentences.py: Open Speech Repository
Harvard-sentence recordings cut into sentences, LibriSpeech utterances) from copies of the
repositories that ship them; --fsdd and --snapshot may be given together or alone.

Real recordings come from the Free Spoken Digit Dataset (FSDD, CC BY-SA 4.0): six male
speakers with US, Belgian-French, German and Greek accents, each saying every English digit
50 times into his own microphone at 8 kHz. The files are read from a copy of the repository
github.com/Jakobovski/free-spoken-digit-dataset (tested with commit
26eb9aaf76e81b692f806f9140c2d2777410d7a1): FSDD is either a checkout (with a
`recordings/` folder) or a bare git directory (read through `git show`). No package
registry ships these recordings, so this part needs that repository copy.

Every utterance is one spoken digit, resampled to 16 kHz and written as a 16-bit WAV. The
calibration/evaluation split is BY SPEAKER AND BY SENTENCE: calibration speakers say digits
0-4 only, evaluation speakers say digits 5-9 only, so no voice and no transcript is in both
parts. `--per-cell` takes the first N takes (file index 0..N-1) of each (speaker, digit).

Writes OUT/audio/real/*.wav and OUT/real-{calib,eval}.jsonl, and when --synthetic is given
(a folder written by python/make_devset.py) OUT/{calib,eval,all}.jsonl: the synthetic
manifests' entries (audio made absolute, `source`: "synthetic") followed by the real ones
(`subset`: "real", `source`: "fsdd", `speaker`). WER reports group by `subset`, so the real
recordings get their own score beside the synthetic subsets (piper, espeak, noisy).
With --bounded-synthetic S --bounded-real R it also writes OUT/eval-bounded.jsonl: S synthetic
and R real evaluation utterances (the first by SHA-1 of "0:<id>", so the choice is stable), an
evaluation part small enough for multi-seed sweeps on a 2-core machine.
Files are written to a temporary name and renamed; existing audio is kept (resumable).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_LICENSE = "CC BY-SA 4.0"
# Speakers split so that each part has a US-English voice and a non-native accent.
FSDD_SPEAKERS = {
    "calib": ("jackson", "nicolas", "lucas"),  # US, Belgian French, German
    "eval": ("theo", "yweweler", "george"),  # US, German, Greek
}
FSDD_DIGITS = {"calib": (0, 1, 2, 3, 4), "eval": (5, 6, 7, 8, 9)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TARGET_SR = 16000


class RepoReader:
    """Read files of a repository copy: a checkout folder or a bare git directory."""

    def __init__(self, root: str | Path, option: str = "--fsdd", marker: str = "recordings"):
        # option names the command-line argument in errors; marker is a folder every checkout has.
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{option}: no such folder: {self.root}")
        self.checkout = (self.root / marker).exists()
        if not self.checkout and not (self.root / "HEAD").is_file():
            raise ValueError(f"{option} must be a checkout with {marker} or a bare git directory, got {self.root}")

    def read(self, relpath: str) -> bytes:
        if self.checkout:
            return (self.root / relpath).read_bytes()
        out = subprocess.run(["git", "--git-dir", str(self.root), "show", f"HEAD:{relpath}"],
                             capture_output=True, check=False)
        if out.returncode != 0:
            raise FileNotFoundError(f"{relpath} not in {self.root}: {out.stderr.decode().strip()}")
        return out.stdout

    def commit(self) -> str | None:
        git_dir = self.root / ".git" if self.checkout else self.root
        out = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None


def plan_fsdd(per_cell: dict[str, int]) -> list[dict]:
    """Manifest entries (without audio written) of the FSDD selection, calib then eval.

    per_cell: {"calib": n, "eval": n}, takes per (speaker, digit). Each entry has id, audio
    (relative path under the output folder), text, subset "real", source, speaker, split,
    and the repository path it is read from.
    """
    entries = []
    for split in ("calib", "eval"):
        for speaker in FSDD_SPEAKERS[split]:
            for digit in FSDD_DIGITS[split]:
                for take in range(per_cell[split]):
                    uid = f"fsdd-{digit}_{speaker}_{take}"
                    entries.append({
                        "id": uid, "audio": f"audio/real/{uid}.wav", "text": DIGIT_WORDS[digit],
                        "subset": "real", "source": "fsdd", "speaker": speaker, "split": split,
                        "repo_path": f"recordings/{digit}_{speaker}_{take}.wav",
                    })
    return entries


def check_disjoint(entries: list[dict]) -> None:
    """Raise ValueError if any speaker or transcript occurs in both calib and eval."""
    for key in ("speaker", "text"):
        calib = {e[key] for e in entries if e["split"] == "calib"}
        evals = {e[key] for e in entries if e["split"] == "eval"}
        if calib & evals:
            raise ValueError(f"{key} in both calibration and evaluation parts: {sorted(calib & evals)}")


def _write_wav_atomic(path: Path, audio, sr: int) -> None:
    import soundfile as sf

    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), audio, sr, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _write_jsonl_atomic(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_fsdd(reader: RepoReader, entries: list[dict], out: Path) -> list[dict]:
    """Resample each selected recording to 16 kHz mono WAV under `out`; returns manifest rows
    (the entries plus `duration` in seconds, without the bookkeeping keys)."""
    import soundfile as sf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fade_kernels.data.audio import resample

    (out / "audio" / "real").mkdir(parents=True, exist_ok=True)
    rows = []
    for e in entries:
        dst = out / e["audio"]
        if not dst.is_file():
            data, sr = sf.read(io.BytesIO(reader.read(e["repo_path"])), dtype="float32", always_2d=True)
            _write_wav_atomic(dst, resample(data.mean(axis=1), sr, TARGET_SR), TARGET_SR)
        duration = sf.info(str(dst)).duration
        row = {k: v for k, v in e.items() if k not in ("repo_path",)}
        row["duration"] = round(duration, 3)
        rows.append(row)
    return rows


def merge_synthetic(synthetic: Path, real_rows: list[dict], out: Path) -> dict[str, int]:
    """OUT/{calib,eval,all}.jsonl = synthetic manifest rows (audio absolute) + real rows."""
    counts = {}
    for part in ("calib", "eval"):
        rows = []
        with open(synthetic / f"{part}.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    row["audio"] = str((synthetic / row["audio"]).resolve())
                    row.setdefault("source", "synthetic")
                    rows.append(row)
        rows += [r for r in real_rows if r["split"] == part]
        _write_jsonl_atomic(rows, out / f"{part}.jsonl")
        counts[part] = len(rows)
    all_rows = [json.loads(line) for part in ("calib", "eval") for line in open(out / f"{part}.jsonl") if line.strip()]
    _write_jsonl_atomic(all_rows, out / "all.jsonl")
    return counts


def bounded_eval(rows: list[dict], n_synthetic: int, n_real: int) -> list[dict]:
    """The first n_synthetic synthetic and n_real real rows in SHA-1 order of "0:<id>"."""
    def rank(row):
        return hashlib.sha1(f"0:{row['id']}".encode()).hexdigest()

    synthetic = sorted((r for r in rows if r.get("source", "synthetic") == "synthetic"), key=rank)
    real = sorted((r for r in rows if r.get("source", "synthetic") != "synthetic"), key=rank)
    return synthetic[:n_synthetic] + real[:n_real]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsdd", help="copy of the free-spoken-digit-dataset repository (checkout or bare git dir)")
    ap.add_argument("--snapshot", action="append", default=[], metavar="OWNER/NAME=PATH",
                    help="copy of a repository holding real sentences (python/real_sentences.py lists them); "
                         "give every one of them to add the sentence part")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--synthetic", help="folder written by python/make_devset.py, merged into OUT/{calib,eval,all}.jsonl")
    ap.add_argument("--per-cell-calib", type=int, default=10, help="calibration takes per (speaker, digit)")
    ap.add_argument("--per-cell-eval", type=int, default=10, help="evaluation takes per (speaker, digit)")
    ap.add_argument("--bounded-synthetic", type=int, default=80, help="synthetic utterances in eval-bounded.jsonl")
    ap.add_argument("--bounded-real", type=int, default=60, help="real utterances in eval-bounded.jsonl")
    args = ap.parse_args(argv)
    for name in ("per_cell_calib", "per_cell_eval"):
        if not 1 <= getattr(args, name) <= 50:
            ap.error(f"--{name.replace('_', '-')} must be in [1, 50] (FSDD has 50 takes per speaker and digit)")
    if not args.fsdd and not args.snapshot:
        ap.error("give --fsdd, --snapshot OWNER/NAME=PATH for every sentence repository, or both")
    snapshots = dict(s.split("=", 1) for s in args.snapshot if "=" in s)
    if len(snapshots) != len(args.snapshot):
        ap.error("--snapshot must be OWNER/NAME=PATH")
    if args.snapshot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import real_sentences

        missing = sorted(set(real_sentences.SENTENCE_REPOS) - set(snapshots))
        if missing:
            ap.error("--snapshot missing for " + ", ".join(
                f"{r} (commit {real_sentences.SENTENCE_REPOS[r]['commit']})" for r in missing))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = plan_fsdd({"calib": args.per_cell_calib, "eval": args.per_cell_eval}) if args.fsdd else []
    sentence_entries = real_sentences.plan_sentences() if args.snapshot else []
    check_disjoint(entries)
    rows = []
    if args.fsdd:
        reader = RepoReader(args.fsdd)
        rows += write_fsdd(reader, entries, out)
    summary = {}
    if args.snapshot:
        real_sentences.check_sentence_split(sentence_entries)
        real_sentences.check_not_reserved(sentence_entries)
        readers = {repo: RepoReader(path, option=f"--snapshot {repo}", marker=".git") for repo, path in snapshots.items()}
        sentence_rows, skipped = real_sentences.write_sentences(readers, sentence_entries, out)
        rows += sentence_rows
        # Transcripts read from the repositories are known only now: check the whole real part again.
        check_disjoint(rows)
        real_sentences.check_not_reserved(sentence_rows)
        summary["sentences"] = dict(real_sentences.sources_summary(), skipped_files=skipped,
                                    snapshot_commits={r: readers[r].commit() for r in readers})
    for part in ("calib", "eval"):
        _write_jsonl_atomic([r for r in rows if r["split"] == part], out / f"real-{part}.jsonl")
    if args.fsdd:
        summary["fsdd"] = {"repository": "Jakobovski/free-spoken-digit-dataset", "commit": reader.commit() or FSDD_COMMIT,
                           "license": FSDD_LICENSE, "speakers": FSDD_SPEAKERS, "digits": FSDD_DIGITS}
    summary["real"] = {p: sum(r["split"] == p for r in rows) for p in ("calib", "eval")}
    summary["real_seconds"] = round(sum(r["duration"] for r in rows), 1)
    if args.synthetic:
        summary["merged"] = merge_synthetic(Path(args.synthetic), rows, out)
        merged_eval = [json.loads(line) for line in open(out / "eval.jsonl", encoding="utf-8") if line.strip()]
        bounded = bounded_eval(merged_eval, args.bounded_synthetic, args.bounded_real)
        _write_jsonl_atomic(bounded, out / "eval-bounded.jsonl")
        summary["eval_bounded"] = len(bounded)
    (out / "real-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
