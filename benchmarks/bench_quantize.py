"""Whole-model quantization benchmark: wall time per pipeline stage and peak memory.

    python benchmarks/bench_quantize.py --models large-v3,bundled:tiny.en --n-calib 16 --out runs/bench_quantize
    python benchmarks/bench_quantize.py --models tiny-random --n-calib 2 --out /tmp/bq      # smoke test, seconds

Models: `large-v3` is a Whisper with large-v3's shapes (d_model 1280, 32 + 32 layers, 20 heads, FFN
5120, 128 mel bins, vocabulary 51866; 1.55 B parameters) and random weights (seed 0); `tiny-random`
is a 2 + 2 layer, d_model 128 model for smoke tests; `bundled:tiny.en`, a local directory or a hub id
are used as they are. A random model is built once and saved (float32 safetensors, with tiny.en's
tokenizer and generation config and a feature extractor of the right mel count) under
<fade cache>/bench/random-whisper-<name>, so `benchmarks/llmcompressor_baseline.py --model <that dir>`
quantizes the very same weights. Building large-v3 takes minutes and 6.2 GB of disk.

Calibration: `--calib MANIFEST` (the first --n-calib utterances drawn with --seed, as `fade quantize`
does), else synthetic speech-like audio (harmonic glides + noise, 3-8 s, seeded) written as WAV files
with a manifest into <out>/synthetic/calib.jsonl: give that manifest to llm-compressor's baseline
(--calib ... --n-calib N --seed S) for the same utterances.

Each model runs in its own subprocess: load (memory-mapped safetensors), prepare the samples, reset
the kernel's RSS high-water mark (/proc/self/clear_refs 5), run quantize_model, read VmHWM. Peak
memory is therefore the process's RSS peak during quantization, model weights included; the target
is fp32 model size + 2 GB. Time per stage comes from QuantizationReport.stage_seconds (exclusive:
capture, forward, statistics, factorisation, sweep, solve, diagnostics, packing, checkpoint,
offload). `--llmcompressor-json` merges llm-compressor's GPTQ `oneshot` time and peak RSS from the
baseline's result.json; the target is fade's wall time <= 0.5x llm-compressor's.

Writes <out>/bench_quantize.json and <out>/bench_quantize.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
TARGET_EXTRA_BYTES = 2 * GB
STAGES = ("capture", "forward", "statistics", "factorisation", "sweep", "solve", "diagnostics", "packing",
          "checkpoint", "offload")
RANDOM_MODELS = {
    # whisper-large-v3's config.json shapes
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                     vocab_size=51866, max_source_positions=1500, max_target_positions=448),
    # K = 128 and 256: group 128 divides every layer width
    "tiny-random": dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=80,
                        vocab_size=51866, max_source_positions=1500, max_target_positions=448),
}
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things.",
    "Where is the nearest train station from here?", "We will meet at half past seven near the old bridge.",
    "The weather today is cold and windy with some rain.", "Turn left at the second traffic light.",
    "My favourite book is about a sailor lost at sea.", "Could you repeat the last number, please?",
    "The meeting has been moved to Thursday afternoon.", "Fresh bread is sold every morning at the market.",
    "She opened the window to let the warm air in.", "Three large boxes arrived with the morning post.",
)


# ------------------------------------------------------------------------------------------ inputs
def random_model_dir(name: str, cache: Path) -> Path:
    """Build (once) and save a random-weight Whisper with RANDOM_MODELS[name]'s shapes; returns its dir."""
    out = cache / f"random-whisper-{name}"
    # transformers 5 saves the processor as processor_config.json, 4.x as preprocessor_config.json.
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and any(
            (out / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        return out
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor)

    from fade_kernels.models.bundled import resolve_model

    tiny = Path(resolve_model("bundled:tiny.en"))   # tokenizer, special ids, generation config
    config = WhisperConfig.from_pretrained(tiny)
    for key, value in RANDOM_MODELS[name].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    print(f"building random whisper-{name} once into {out} ...", flush=True)
    model = WhisperForConditionalGeneration(config).eval()
    processor = WhisperProcessor.from_pretrained(tiny)
    processor.feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copy(tiny / "generation_config.json", tmp / "generation_config.json")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def synthetic_manifest(folder: Path, n: int, seed: int) -> Path:
    """n speech-like WAV files (16 kHz, 3-8 s: harmonic glides with syllable-rate envelopes plus
    noise) and their manifest; texts cycle through SENTENCES."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(n):
        seconds = rng.uniform(3.0, 8.0)
        t = np.arange(int(16000 * seconds)) / 16000
        f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voice = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
        audio = 0.1 * voice * envelope + 0.01 * rng.standard_normal(t.size)
        name = f"utt{index:03d}.wav"
        sf.write(folder / name, audio.astype(np.float32), 16000)
        lines.append(json.dumps({"audio": name, "text": SENTENCES[index % len(SENTENCES)], "id": f"synthetic-{index}",
                                 "subset": "synthetic"}))
    manifest = folder / "calib.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------ one job
def run_job(args) -> dict:
    import torch

    from fade_kernels.api import MEMO_BUDGET_BYTES, quantize_model
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.config import QuantConfig
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.memory.heap import retention_requested
    from fade_kernels.models.bundled import load_model_and_processor
    from fade_kernels.sweep import PeakMemory

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_model_and_processor(args.job_model_dir)
    load_seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    utterances = select_subset(load_corpus(args.calib), args.n_calib, args.seed)
    start = time.perf_counter()
    samples = prepare_samples(model, processor, utterances, progress=False)
    prep_seconds = time.perf_counter() - start
    config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size)
    checkpoint_dir = Path(args.out) / f"resume-{args.job}" if args.with_resume else None
    # The sweep's peak meter: VmHWM reset through /proc/self/clear_refs at entry, read at exit.
    with PeakMemory() as peak:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        load0 = os.getloadavg()[0]
        report = quantize_model(model, samples, config, batch_size=args.batch_size, progress=False,
                                max_memory=args.max_memory, checkpoint_dir=checkpoint_dir,
                                memo_budget=args.memo_budget)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    fp32_bytes = n_params * 4
    per_call = peak.increase_mb is not None
    peak_bytes = int(peak.peak_mb * 2 ** 20) if per_call else None
    return {
        "job": args.job, "model": args.job_model, "model_dir": str(args.job_model_dir), "parameters": n_params,
        "fp32_bytes": fp32_bytes, "n_calib": len(samples), "batch_size": args.batch_size,
        "config": config.to_dict(), "calib": str(args.calib), "seed": args.seed,
        "calib_ids": [u.id for u in utterances] if all(hasattr(u, "id") for u in utterances) else None,
        "load_seconds": round(load_seconds, 2), "prepare_seconds": round(prep_seconds, 2),
        "quantize_seconds": round(report.seconds, 3),
        "quantize_cpu_seconds": round(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime, 2),
        "stage_seconds": report.stage_seconds,
        "rss_before_bytes": int(peak.start_mb * 2 ** 20) if peak.start_mb else None,
        "peak_rss_bytes": peak_bytes, "peak_rss_method": peak.method if per_call else "unavailable",
        "peak_rss_process_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "target_bytes": fp32_bytes + TARGET_EXTRA_BYTES,
        "within_target": None if peak_bytes is None else peak_bytes <= fp32_bytes + TARGET_EXTRA_BYTES,
        "offloaded_mb": report.offloaded_mb, "released_mb": report.released_mb, "max_memory": args.max_memory,
        "memo_budget_bytes": MEMO_BUDGET_BYTES if args.memo_budget is None else args.memo_budget,
        # memory/heap.py: freed buffers kept in the process during quantization
        "retain_freed_memory": retention_requested(),
        "mean_rel_output_error": sum(l.rel_output_error for l in report.layers) / max(len(report.layers), 1),
        "n_layers": len(report.layers), "torch_threads": torch.get_num_threads(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit}


def llmcompressor_entry(path: str) -> dict:
    """The successful GPTQ job of llm-compressor's result.json (pipeline 'basic' preferred)."""
    data = json.loads(Path(path).read_text())
    jobs = [j for j in data.get("jobs", []) if j.get("status") == "ok" and "oneshot_seconds" in j]
    if not jobs:
        raise SystemExit(f"--llmcompressor-json {path}: no successful job with oneshot_seconds "
                         f"(statuses: {[j.get('status') for j in data.get('jobs', [])]})")
    job = next((j for j in jobs if str(j.get("job", "")).endswith("basic")), jobs[0])
    return {"file": path, "pipeline": job.get("job"), "model": data.get("model"), "n_calib": data.get("n_calib"),
            "seed": data.get("seed"), "calib": data.get("calib"), "oneshot_seconds": job["oneshot_seconds"],
            "oneshot_cpu_seconds": job.get("oneshot_cpu_seconds"),
            "peak_rss_mb": job.get("peak_rss_oneshot_mb"), "machine": data.get("machine")}


def markdown(result: dict) -> str:
    gib = 2**30
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"torch {result['machine']['torch']}, commit {result['machine']['commit']}; "
             f"command: `{result['command']}`", "",
             "| model | params | fp32 GiB | utts | quantize s | " + " | ".join(STAGES) +
             " | peak RSS GiB | target GiB | within |",
             "|---" * (8 + len(STAGES)) + "|"]
    for job in result["jobs"]:
        if "error" in job:
            lines.append(f"| {job['model']} | failed: {job['error'][:120]} |")
            continue
        peak = job["peak_rss_bytes"]
        stages = " | ".join(f"{job['stage_seconds'].get(s, 0.0):.2f}" for s in STAGES)
        lines.append(f"| {job['model']} | {job['parameters'] / 1e6:.1f} M | {job['fp32_bytes'] / gib:.2f} | "
                     f"{job['n_calib']} | {job['quantize_seconds']:.1f} | {stages} | "
                     f"{'n/a' if peak is None else f'{peak / gib:.2f}'} | {job['target_bytes'] / gib:.2f} | "
                     f"{'n/a' if job['within_target'] is None else ('yes' if job['within_target'] else 'NO')} |")
    llmc = result.get("llmcompressor")
    if llmc:
        lines += ["", f"llm-compressor GPTQ ({llmc['pipeline']} pipeline, {llmc['n_calib']} utterances, "
                      f"model {llmc['model']}): oneshot {llmc['oneshot_seconds']:.1f} s, "
                      f"peak RSS {llmc['peak_rss_mb']} MB (from {llmc['file']})"]
        for job in result["jobs"]:
            if "ratio_vs_llmcompressor" in job:
                note = f"; {job['llmcompressor_note']}" if job.get("llmcompressor_note") else ""
                lines.append(f"- {job['model']}: fade / llm-compressor wall time = "
                             f"{job['ratio_vs_llmcompressor']:.2f} (target <= 0.5){note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="large-v3,bundled:tiny.en",
                        help="comma list: large-v3, tiny-random, bundled:tiny.en, a local dir or hub id")
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", help="calibration manifest (default: synthetic audio written into --out)")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-memory", help="quantize_model's activation-cache budget, e.g. 2GB (default none)")
    parser.add_argument("--memo-budget", type=int,
                        help="bytes for replaying solved layers' outputs (quantize_model's memo_budget, default "
                             "fade_kernels.api.MEMO_BUDGET_BYTES; "
                             "0 turns the replay off)")
    parser.add_argument("--with-resume", action="store_true", help="also write resume state after each block")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's)")
    parser.add_argument("--model-cache", help="where random models are saved (default <fade cache>/bench)")
    parser.add_argument("--llmcompressor-json", help="result.json of benchmarks/llmcompressor_baseline.py to compare")
    parser.add_argument("--out", default="runs/bench_quantize")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-model", help=argparse.SUPPRESS)
    parser.add_argument("--job-model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.n_calib < 1:
        parser.error(f"--n-calib must be at least 1, got {args.n_calib}")

    if args.job:   # the child: one model, measured alone
        try:
            result = run_job(args)
        except Exception as error:  # noqa: BLE001 - reported in the table, the other models still run
            import traceback

            result = {"job": args.job, "model": args.job_model, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        (out / f"job-{args.job}.json").write_text(json.dumps(result, indent=1))
        return

    from fade_kernels.models.bundled import cache_dir, resolve_model

    calib = args.calib or str(synthetic_manifest(out / "synthetic", args.n_calib, args.seed))
    cache = Path(args.model_cache) if args.model_cache else cache_dir() / "bench"
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "calib": calib,
              "n_calib": args.n_calib, "seed": args.seed, "jobs": []}
    for index, name in enumerate(m.strip() for m in args.models.split(",") if m.strip()):
        model_dir = random_model_dir(name, cache) if name in RANDOM_MODELS else Path(resolve_model(name))
        job = f"{index}-{name.replace(':', '_').replace('/', '_')}"
        passthrough = [a for a in sys.argv[1:]]
        if not args.calib:
            passthrough += ["--calib", calib]
        print(f"=== {name} ({model_dir})", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--job", job,
                               "--job-model", name, "--job-model-dir", str(model_dir)])
        job_file = out / f"job-{job}.json"
        record = json.loads(job_file.read_text()) if job_file.is_file() else \
            {"job": job, "model": name, "error": f"the job process exited with {proc.returncode}"}
        result["jobs"].append(record)
        if "error" in record:
            print(f"    failed: {record['error']}", flush=True)
        else:
            print(f"    quantize {record['quantize_seconds']:.1f} s, peak RSS "
                  f"{(record['peak_rss_bytes'] or 0) / 2**30:.2f} GiB (fp32 {record['fp32_bytes'] / 2**30:.2f} GiB)",
                  flush=True)
    if args.llmcompressor_json:
        llmc = llmcompressor_entry(args.llmcompressor_json)
        result["llmcompressor"] = llmc
        for job in result["jobs"]:
            if "error" in job:
                continue
            job["ratio_vs_llmcompressor"] = job["quantize_seconds"] / llmc["oneshot_seconds"]
            notes = []
            if llmc.get("model") and Path(llmc["model"]).expanduser().resolve() != Path(job["model_dir"]).resolve():
                notes.append(f"different model ({llmc['model']})")
            if llmc.get("n_calib") not in (None, job["n_calib"]):
                notes.append(f"llm-compressor used {llmc['n_calib']} utterances")
            job["llmcompressor_note"] = ", ".join(notes)
    (out / "bench_quantize.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "bench_quantize.md").write_text(text)
    print(text)
    print(f"wrote {out / 'bench_quantize.json'} and {out / 'bench_quantize.md'}")


if __name__ == "__main__":
    main()
