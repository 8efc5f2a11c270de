"""End to end transcription on CPU, as a user runs it: our models vs faster-whisper, same utterances.

Each row transcribes the first --max-utts utterances of --manifest in a fresh subprocess (so that
peak memory, VmHWM, is the row's own) and reports wall seconds of transcription (model loading
and a one-utterance warm-up excluded), audio seconds per wall second, output tokens per second,
peak memory and the WER (fade_kernels/eval/wer.py, same normaliser for every row).

Rows
  ours     --models specs (bundled:tiny.en, a hub id, a local dir) and --checkpoints
           (quantized checkpoint dirs written by `fade quantize`), through eval.decode.transcribe
           (the code `fade eval` / `fade transcribe` run), --dtypes fp32 / bf16 for full-precision
           models, --decoders lean / generate, at every --threads and --batch
  faster-whisper  `WhisperModel.transcribe` (beam_size=1, without_timestamps=True,
           condition_on_previous_text=False, no VAD, language="en" as ours forces English on a
           multilingual model), one file at a time, and its BatchedInferencePipeline
           (batch = --batch), compute types --fw-compute-types, on the CTranslate2 directory
           --ct2-dir (default: the one the first bundled: model of --models is converted from),
           run with the Python of --fw-venv (built with --build-fw-venv; rows skipped with a
           message when it is missing)

Decoding: greedy in every row by default (faster-whisper with temperature=0.0 only). With
--temperature-fallback every row retries looping or unlikely transcripts at rising temperatures:
ours `transcribe(..., temperature_fallback=True)` (what `fade eval --temperature-fallback` runs),
faster-whisper its default temperatures (0.0, 0.2, ..., 1.0), which is what a plain
`WhisperModel.transcribe` call does.

  python benchmarks/bench_e2e_transcribe.py --manifest devset/eval.jsonl --max-utts 100 \\
      --checkpoints w4=ckpt/tiny.en-w4 --threads 1 2 --batch 1 8 --json e2e.json --md e2e.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FW_VENV = Path.home() / ".cache" / "fade-kernels" / "venvs" / "faster-whisper"


def vm_hwm_mb() -> float | None:
    """Peak resident memory of this process (VmHWM) in MiB, None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- worker: one row in a fresh process ------------------------------------------------------

def _manifest_audio(manifest: str, max_utts: int) -> list[dict]:
    from fade_kernels.data.corpus import load_corpus

    return [{"id": u.id, "audio": str(u.audio), "text": u.text, "subset": u.subset}
            for u in load_corpus(manifest)[:max_utts]]


def run_ours(spec: dict) -> dict:
    """spec: {"model", "dtype", "decoder", "threads", "batch", "manifest", "max_utts"}."""
    import torch

    torch.set_num_threads(spec["threads"])
    from fade_kernels.cli import load_cli_model
    from fade_kernels.data.audio import load_audio
    from fade_kernels.eval.decode import transcribe

    model, processor = load_cli_model(spec["model"])
    if spec["dtype"] == "bf16":
        model.to(torch.bfloat16)
    utts = _manifest_audio(spec["manifest"], spec["max_utts"])
    audios = [load_audio(u["audio"]) for u in utts]
    kwargs = dict(batch_size=spec["batch"], progress=False, decoder=spec["decoder"],
                  temperature_fallback=spec.get("temperature_fallback", False))
    transcribe(model, processor, audios[:1], **kwargs)                       # warm-up
    encoder = model.get_encoder()
    encoder_seconds = [0.0]
    plain_forward = encoder.forward

    def timed_forward(*a, **kw):                                                # the encoder's share of the time
        t = time.perf_counter()
        out = plain_forward(*a, **kw)
        encoder_seconds[0] += time.perf_counter() - t
        return out

    encoder.forward = timed_forward
    start = time.perf_counter()
    hyps = transcribe(model, processor, audios, **kwargs)
    seconds = time.perf_counter() - start
    del encoder.forward
    tokens = sum(len(processor.tokenizer(h, add_special_tokens=False).input_ids) for h in hyps)
    return {"hyps": hyps, "seconds": seconds, "encoder_seconds": encoder_seconds[0], "tokens": tokens,
            "peak_mb": vm_hwm_mb()}


FW_WORKER = r'''
import json, sys, time
spec = json.loads(sys.argv[1])
from faster_whisper import WhisperModel, BatchedInferencePipeline
model = WhisperModel(spec["ct2_dir"], device="cpu", compute_type=spec["compute_type"], cpu_threads=spec["threads"])
options = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False, vad_filter=False,
               language="en")
if not spec["temperature_fallback"]:
    options["temperature"] = 0.0
if spec["batched"]:
    pipe = BatchedInferencePipeline(model)
    run = lambda path: pipe.transcribe(path, batch_size=spec["batch"], **options)
else:
    run = lambda path: model.transcribe(path, **options)
def text(path):
    segments, _ = run(path)
    segments = list(segments)
    return "".join(s.text for s in segments).strip(), sum(len(s.tokens) for s in segments)
text(spec["paths"][0])
start = time.perf_counter()
out = [text(p) for p in spec["paths"]]
seconds = time.perf_counter() - start
hwm = None
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) / 1024
print("RESULT " + json.dumps({"hyps": [h for h, _ in out], "tokens": sum(t for _, t in out), "seconds": seconds,
                             "peak_mb": hwm}))
'''


def _subprocess(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"row failed ({' '.join(cmd[:3])} ...):\n{proc.stderr[-3000:]}")


def bundled_ct2_dir(models: list[str]) -> str:
    """The CTranslate2 directory behind the first bundled:NAME of `models` (tiny.en without one)."""
    from fade_kernels.models.bundled import _bundled_source, bundled_name

    names = [name for name in map(bundled_name, models) if name is not None]
    return str(_bundled_source(names[0] if names else "tiny.en"))


def build_fw_venv(path: Path) -> None:
    """python -m venv PATH && PATH/bin/pip install faster-whisper (outside this repository)."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "faster-whisper"], check=True)


# ---- driver ----------------------------------------------------------------------------------

def score(utts: list[dict], hyps: list[str], processor) -> float:
    from fade_kernels.data.corpus import Utterance
    from fade_kernels.eval.wer import get_normalizer, wer_report

    objs = [Utterance(id=u["id"], audio=u["audio"], text=u["text"], subset=u["subset"]) for u in utts]
    return wer_report(objs, hyps, normalizer=get_normalizer(processor))["wer"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--max-utts", type=int, default=100)
    parser.add_argument("--models", nargs="*", default=["bundled:tiny.en"], help="full-precision model specs")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="LABEL=DIR", help="quantized checkpoints")
    parser.add_argument("--decoders", nargs="*", default=["lean"], choices=["lean", "generate"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--ct2-dir", help="CTranslate2 model of the faster-whisper rows (default: that of the first "
                             "bundled: model of --models)")
    parser.add_argument("--fw-venv", default=str(DEFAULT_FW_VENV), help="virtual env with faster-whisper")
    parser.add_argument("--build-fw-venv", action="store_true", help="create --fw-venv and pip install faster-whisper")
    parser.add_argument("--fw-compute-types", nargs="*", default=["int8", "float32"])
    parser.add_argument("--temperature-fallback", action="store_true",
                        help="every row retries looping / unlikely transcripts at rising temperatures "
                             "(default: greedy only, faster-whisper included)")
    parser.add_argument("--json")
    parser.add_argument("--md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_ours(json.loads(args.worker))))
        return {}

    sys.path.insert(0, str(HERE))
    from _common import machine_info, machine_line, read_bandwidth

    from fade_kernels.models.bundled import load_model_and_processor

    # Token counts use the tokenizer of the model the rows share (base's is multilingual).
    _, processor = load_model_and_processor(args.models[0] if args.models else "bundled:tiny.en")
    utts = _manifest_audio(args.manifest, args.max_utts)
    import soundfile as sf

    audio_seconds = sum(sf.info(u["audio"]).duration for u in utts)
    # This VM's memory bandwidth changes from day to day: the run names the one it had.
    read_gb_s = {threads: read_bandwidth(threads) for threads in args.threads}
    rows = []

    def add(label, threads, batch, result):
        wer = score(utts, result["hyps"], processor)
        row = {"system": label, "threads": threads, "batch": batch, "seconds": result["seconds"],
               "audio_s_per_s": audio_seconds / result["seconds"], "tokens": result["tokens"],
               "tokens_per_s": result["tokens"] / result["seconds"], "peak_mb": result["peak_mb"], "wer": wer,
               "encoder_seconds": result.get("encoder_seconds")}
        # Decoder share per output token: everything but the encoder (features, decoding, detokenising).
        if row["encoder_seconds"] is not None:
            row["ms_per_token_outside_encoder"] = 1e3 * (row["seconds"] - row["encoder_seconds"]) / max(1, row["tokens"])
        rows.append(row)
        print(f"{label:40s} threads {threads} batch {batch}: {row['seconds']:.1f} s, "
              f"{row['audio_s_per_s']:.1f} audio s/s, {row['tokens_per_s']:.0f} tok/s, "
              f"peak {row['peak_mb'] or 0:.0f} MiB, WER {100 * wer:.2f}", flush=True)

    ours = [(f"{m} {d}", m, d) for m in args.models for d in args.dtypes]
    ours += [(label, path, "fp32") for label, _, path in (c.partition("=") for c in args.checkpoints)]
    for label, model, dtype in ours:
        for decoder in args.decoders:
            for threads in args.threads:
                for batch in args.batch:
                    spec = {"model": model, "dtype": dtype, "decoder": decoder, "threads": threads, "batch": batch,
                            "manifest": args.manifest, "max_utts": args.max_utts,
                            "temperature_fallback": args.temperature_fallback}
                    result = _subprocess([sys.executable, __file__, "--manifest", args.manifest, "--worker",
                                          json.dumps(spec)], threads)
                    add(f"ours {label} ({decoder})", threads, batch, result)

    fw_python = Path(args.fw_venv) / "bin" / "python"
    if args.build_fw_venv and not fw_python.exists():
        build_fw_venv(Path(args.fw_venv))
    skipped = None
    if not fw_python.exists():
        skipped = f"faster-whisper rows skipped: no virtual env at {args.fw_venv} (rerun with --build-fw-venv)"
        print(skipped)
    else:
        ct2_dir = args.ct2_dir or bundled_ct2_dir(args.models)
        for compute_type in args.fw_compute_types:
            for threads in args.threads:
                for batched, batches in ((False, [1]), (True, [b for b in args.batch if b > 1])):
                    for batch in batches:
                        spec = {"ct2_dir": ct2_dir, "compute_type": compute_type, "threads": threads,
                                "batched": batched, "batch": batch, "paths": [u["audio"] for u in utts],
                                "temperature_fallback": args.temperature_fallback}
                        result = _subprocess([str(fw_python), "-c", FW_WORKER, json.dumps(spec)], threads)
                        name = "BatchedInferencePipeline" if batched else "WhisperModel.transcribe"
                        add(f"faster-whisper {compute_type} {name}", threads, batch, result)

    info = machine_info()
    result = {"machine": info, "read_gb_s": read_gb_s, "manifest": args.manifest, "n_utts": len(utts),
              "audio_seconds": audio_seconds,
              "temperature_fallback": args.temperature_fallback,
              "rows": rows, "skipped": skipped, "argv": sys.argv[1:] if argv is None else list(argv)}
    bandwidth = ", ".join(f"{gb:.1f} GB/s on {t} thread{'s' if t > 1 else ''}" for t, gb in read_gb_s.items())
    lines = [machine_line(info) + f"; read bandwidth at start {bandwidth}", "", f"{len(utts)} utterances, {audio_seconds:.0f} s of audio; wall time of "
             "transcription only (load and a one-utterance warm-up excluded); one subprocess per row; decoding: "
             + ("greedy with temperature fallback in every row." if args.temperature_fallback else
                "greedy in every row (no temperature fallback)."), "",
             "| system | threads | batch | seconds | encoder s | ms / token outside encoder | audio s / s | "
             "tokens / s | peak MiB | WER % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        enc = "" if r["encoder_seconds"] is None else f"{r['encoder_seconds']:.1f}"
        per_token = f"{r['ms_per_token_outside_encoder']:.1f}" if "ms_per_token_outside_encoder" in r else ""
        lines.append(f"| {r['system']} | {r['threads']} | {r['batch']} | {r['seconds']:.1f} | {enc} | {per_token} | "
                     f"{r['audio_s_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mb'] or 0:.0f} | "
                     f"{100 * r['wer']:.2f} |")
    if skipped:
        lines += ["", skipped]
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
