"""Reference baseline: llm-compressor's GPTQ W4A16 (group 128) recipe on our model and data.

Runs INSIDE the separate benchmark venv ($LLMC_VENV, see benchmarks/README_llmcompressor.md
and benchmarks/run_llmcompressor_baseline.sh); llm-compressor is not a fade-kernels dependency.

What it does, each step in a fresh subprocess (clean llm-compressor state, clean peak RSS):

* ``fp32``: evaluate the full-precision model on --eval with fade_kernels.eval.decode.evaluate.
* one job per --pipelines entry (default ``sequential,basic``):
  1. load the fp32 checkpoint (a transformers Whisper dir) and processor;
  2. calibration data = ``select_subset(load_corpus(--calib), --n-calib, --seed)`` turned into
     tensors by fade_kernels.calib.samples.prepare_samples -- the very utterances, log-mel
     features and teacher-forced decoder ids (prompt + transcript + <|endoftext|>) that
     ``fade quantize --calib ... --n-calib N --seed S`` uses; fed one utterance per batch as
     {input_features (1, 80, 3000), decoder_input_ids (1, L)};
  3. ``oneshot(model, dataset=DataLoader, recipe=GPTQModifier(targets="Linear", scheme="W4A16",
     ignore=["proj_out"]), pipeline=<name>)`` -- W4A16 = int4 symmetric, group 128, and
     GPTQModifier's defaults (block_size 128, dampening_frac 0.01, actorder "static");
     wall time and peak RSS of that call alone are measured. A failure (e.g. the sequential
     pipeline's torch.fx trace of Whisper) is recorded with its exact error;
  4. ``save_pretrained(save_compressed=True)`` (packed int4 compressed-tensors checkpoint), then
     reload it with ``CompressedTensorsConfig(run_compressed=False)`` (decompressed to dense
     float weights) and check every quantized Linear: its weight differs from fp32, each group
     of 128 input columns holds <= 16 distinct values, and it equals the in-memory weight
     right after oneshot;
  5. evaluate the reloaded model on --eval with the same evaluate() call as fp32.

  --timing-only (for speed comparisons on models too large to hold twice, e.g. the random
  large-v3 of benchmarks/bench_quantize.py): no fp32 copy of the weights, no save / reload /
  eval; after oneshot, the first and last quantized Linear are checked in memory (<= 16 distinct
  values per group of 128).

Writes <out>/result.json (all jobs) and prints a summary. Usage (inside the venv):

  python benchmarks/llmcompressor_baseline.py --model ~/.cache/fade-kernels/bundled/tiny.en \
      --calib devset/calib.jsonl --eval devset/eval.jsonl --out /tmp/llmc-baseline
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

GROUP_SIZE = 128  # the W4A16 preset's group size; asserted against the applied scheme below


# --------------------------------------------------------------------------- memory helpers
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- shared pieces
def load_fp(model_dir: str, dtype: str = "float32"):
    """The full-precision model in `dtype` (llm-compressor writes its scales in the model's dtype)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    return model, processor


def run_eval(model, processor, args) -> dict:
    from fade_kernels.data.corpus import load_corpus
    from fade_kernels.eval.decode import evaluate

    utts = load_corpus(args.eval)
    rep = evaluate(model, processor, utts, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, max_utts=args.max_eval, progress=False)
    counts = ("ref_words", "substitutions", "deletions", "insertions")
    return {
        "wer": rep["wer"],
        "n_utts": rep["n_utts"],
        **{c: rep.get(c) for c in counts},
        "subsets": {k: {"wer": v["wer"], "n_scored": v["n_scored"], **{c: v.get(c) for c in counts}}
                    for k, v in rep.get("subsets", {}).items()},
        "rtf": rep["rtf"],
        "decode_seconds": rep["decode_seconds"],
        "audio_seconds": rep["audio_seconds"],
        "sample_hyps": rep["utterances"][:3],
        "utterances": rep["utterances"],  # moved to <out>/hyps-<job>.json by worker()
    }


def build_calibration(model, processor, args):
    """Same utterances / tensors as `fade quantize --calib C --n-calib N --seed S`."""
    import torch
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.data.corpus import load_corpus, select_subset

    torch.manual_seed(args.seed)  # fade quantize seeds torch before loading/sampling too
    utts = select_subset(load_corpus(args.calib), args.n_calib, args.seed)
    samples = prepare_samples(model, processor, utts, progress=False)
    batches = [
        {"input_features": s.encoder_input.unsqueeze(0).to(model.dtype),
         "decoder_input_ids": s.decoder_ids.unsqueeze(0).long()}
        for s in samples
    ]
    return utts, batches


def quantized_linears(model):
    """(name, module) of Linear modules carrying a compressed-tensors weight scheme."""
    import torch

    out = []
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if isinstance(m, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            out.append((name, m))
    return out


def group_distinct_max(w, group_size: int) -> int:
    """Largest number of distinct values within any (row, group of `group_size` columns)."""
    import torch

    n, k = w.shape
    g = w.detach().float().reshape(n, k // group_size, group_size)
    s, _ = torch.sort(g, dim=-1)
    distinct = (s[..., 1:] != s[..., :-1]).sum(-1) + 1
    return int(distinct.max())


# --------------------------------------------------------------------------- jobs
def job_fp32(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, processor = load_fp(args.model)
    return {"job": "fp32", "status": "ok", "eval": run_eval(model, processor, args)}


def job_quant(args, pipeline: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(args.threads)
    res: dict = {"job": f"llmcompressor-gptq-w4a16-{pipeline}", "pipeline": pipeline, "dtype": args.dtype}
    model, processor = load_fp(args.model, args.dtype)
    fp_weights = {} if args.timing_only else {n: p.detach().clone() for n, p in model.named_parameters()}
    fp_proj_out = model.proj_out.weight.detach().clone()  # tied to decoder.embed_tokens
    t = time.perf_counter()
    utts, batches = build_calibration(model, processor, args)
    res["calibration"] = {
        "manifest": str(args.calib), "n_calib": len(utts), "seed": args.seed,
        "ids": [u.id for u in utts],
        "subsets": {s: sum(u.subset == s for u in utts) for s in sorted({u.subset for u in utts})},
        "decoder_tokens_mean": sum(b["decoder_input_ids"].shape[1] for b in batches) / len(batches),
        "prep_seconds": round(time.perf_counter() - t, 2),
    }
    loader = DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["proj_out"])
    res["recipe"] = {"modifier": "GPTQModifier", "targets": "Linear", "scheme": "W4A16",
                     "ignore": ["proj_out"], "block_size": recipe.block_size,
                     "dampening_frac": recipe.dampening_frac}
    rss_before = _status_kb("VmRSS")
    hwm_reset = reset_peak_rss()
    load_before = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        oneshot(model=model, processor=processor, dataset=loader, recipe=recipe,
                pipeline=pipeline, num_calibration_samples=len(batches))
    except BaseException as e:  # noqa: BLE001 - recorded, then reported as a failed job
        res.update(status="failed", seconds=round(time.perf_counter() - t0, 2),
                   error_type=f"{type(e).__module__}.{type(e).__name__}",
                   error=str(e)[:4000],
                   traceback_tail=traceback.format_exc().splitlines()[-40:])
        return res
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    res.update(
        status="ok",
        oneshot_seconds=round(seconds, 2),
        # CPU seconds (user+sys) of this process during oneshot: less sensitive than wall time
        # to other jobs sharing the machine (see loadavg).
        oneshot_cpu_seconds=round(cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime, 2),
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        rss_before_oneshot_mb=round(rss_before / 1024.0, 1) if rss_before else None,
        # VmHWM after a reset just before oneshot = peak RSS *during* oneshot.
        peak_rss_oneshot_mb=round(_status_kb("VmHWM") / 1024.0, 1) if hwm_reset else None,
        # getrusage: process-lifetime peak (includes model load + calibration features), the
        # number fade's own QuantizationReport.peak_rss_mb reports.
        peak_rss_process_mb=round(ru_maxrss_mb(), 1),
        torch_threads=torch.get_num_threads(),
    )

    # The scheme that was actually applied.
    qlin = quantized_linears(model)
    wargs = qlin[0][1].quantization_scheme.weights
    res["applied_scheme"] = {
        "num_bits": wargs.num_bits, "strategy": str(wargs.strategy), "group_size": wargs.group_size,
        "symmetric": wargs.symmetric, "actorder": str(wargs.actorder), "type": str(wargs.type),
        "n_quantized_linears": len(qlin),
        "not_quantized_linears": sorted(n for n, m in model.named_modules()
                                        if isinstance(m, torch.nn.Linear) and n not in dict(qlin)),
    }
    assert wargs.group_size == GROUP_SIZE and wargs.num_bits == 4, res["applied_scheme"]
    if args.timing_only:
        ends = [qlin[0], qlin[-1]]
        res["weight_checks"] = {name: group_distinct_max(m.weight, GROUP_SIZE) for name, m in ends}
        if max(res["weight_checks"].values()) > 16:
            res.update(status="failed", error="weights are not 4-bit after oneshot: " + json.dumps(res["weight_checks"]))
        return res
    mem_weights = {n + ".weight": m.weight.detach().clone() for n, m in qlin}

    # Save compressed (packed int4), reload decompressed, verify, evaluate.
    qdir = Path(args.out) / f"w4a16-{pipeline}"
    t = time.perf_counter()
    model.save_pretrained(qdir, save_compressed=True)
    processor.save_pretrained(qdir)
    res["save_seconds"] = round(time.perf_counter() - t, 2)
    res["checkpoint_mib"] = round(sum(f.stat().st_size for f in qdir.rglob("*") if f.is_file()) / 2**20, 2)
    qcfg = json.loads((qdir / "config.json").read_text()).get("quantization_config", {})
    res["saved_quantization_config"] = {k: qcfg.get(k) for k in ("format", "quant_method", "ignore")}
    del model

    from transformers import CompressedTensorsConfig, WhisperForConditionalGeneration

    qmodel = WhisperForConditionalGeneration.from_pretrained(
        qdir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    qmodel.eval()
    params = dict(qmodel.named_parameters())
    checks = {"layers": 0, "changed_layers": 0, "max_distinct_per_group": 0,
              "max_abs_diff_vs_in_memory": 0.0, "rel_weight_error_mean": 0.0, "frac_changed_mean": 0.0}
    for name, w_mem in mem_weights.items():
        w = params[name].detach().float()
        w_fp = fp_weights[name].float()
        checks["layers"] += 1
        changed = (w != w_fp)
        checks["changed_layers"] += int(bool(changed.any()))
        checks["frac_changed_mean"] += float(changed.float().mean())
        checks["rel_weight_error_mean"] += float((w - w_fp).norm() / w_fp.norm())
        checks["max_distinct_per_group"] = max(checks["max_distinct_per_group"], group_distinct_max(w, GROUP_SIZE))
        checks["max_abs_diff_vs_in_memory"] = max(checks["max_abs_diff_vs_in_memory"],
                                                  float((w - w_mem.float()).abs().max()))
        checks["max_abs_weight"] = max(checks.get("max_abs_weight", 0.0), float(w.abs().max()))
    checks["frac_changed_mean"] /= max(checks["layers"], 1)
    checks["rel_weight_error_mean"] /= max(checks["layers"], 1)
    checks["proj_out_unchanged"] = bool(torch.equal(qmodel.proj_out.weight.detach(), fp_proj_out))
    checks["plain_linear_forward"] = all(  # no fake-quant wrapper left: eval uses these weights as is
        type(m).forward is torch.nn.Linear.forward and not m._forward_hooks and not m._forward_pre_hooks
        for n, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear))
    sample = next(iter(mem_weights))
    checks["example_layer"] = sample
    checks["example_distinct_row0_group0"] = int(params[sample][0, :GROUP_SIZE].unique().numel())
    res["weight_checks"] = checks
    ok = (checks["layers"] > 0 and checks["changed_layers"] == checks["layers"]
          and checks["max_distinct_per_group"] <= 16
          # the in-memory fake-quantized weights are rounded to the model's dtype; the reload
          # decompresses in float32: they agree to that dtype's rounding (bfloat16: 2^-8 relative)
          and checks["max_abs_diff_vs_in_memory"] <= (1e-6 if args.dtype == "float32"
                                                      else 2.0 ** -8 * checks["max_abs_weight"]))
    if not ok:
        res.update(status="failed", error="reloaded weights are not 4-bit fake-quantized: " + json.dumps(checks))
        return res
    res["eval"] = run_eval(qmodel, processor, args)
    return res


# --------------------------------------------------------------------------- driver
def manifest_fingerprint(path: str) -> dict:
    """sha256 of a manifest and of all the audio it lists (the dev set is regenerated by
    python/make_devset.py; this tells whether two results used the same bytes)."""
    import hashlib

    from fade_kernels.data.corpus import load_corpus

    utts = load_corpus(path)
    audio = hashlib.sha256()
    for u in utts:
        audio.update(Path(u.audio).read_bytes())
    return {"path": str(path), "n_utts": len(utts),
            "manifest_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "audio_sha256": audio.hexdigest()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate",
                "datasets", "fade-kernels", "jiwer"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def worker(args) -> None:
    out = Path(args.out) / f"job-{args.worker}.json"
    try:
        res = job_fp32(args) if args.worker == "fp32" else job_quant(args, args.worker)
    except BaseException as e:  # noqa: BLE001
        res = {"job": args.worker, "status": "crashed", "error_type": type(e).__name__,
               "error": str(e)[:4000], "traceback_tail": traceback.format_exc().splitlines()[-40:]}
    utts = res.get("eval", {}).pop("utterances", None)
    if utts is not None:
        (Path(args.out) / f"hyps-{args.worker}.json").write_text(json.dumps(utts, indent=0, ensure_ascii=False))
    out.write_text(json.dumps(res, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="transformers Whisper checkpoint dir (fp32/fp16)")
    p.add_argument("--calib", default="devset/calib.jsonl")
    p.add_argument("--eval", default="devset/eval.jsonl")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipelines", default="sequential,basic",
                   help="llm-compressor calibration pipelines to try, each in its own process")
    p.add_argument("--skip-fp32", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the model llm-compressor quantizes (and of the scales it saves)")
    p.add_argument("--timing-only", action="store_true",
                   help="measure oneshot only: no fp32 weight copy, no save/reload/eval (large models)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate only the first N utterances")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="/tmp/llmc-baseline", help="output dir (checkpoints + result.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return

    jobs = ([] if args.skip_fp32 else ["fp32"]) + [s.strip() for s in args.pipelines.split(",") if s.strip()]
    passthrough = [a for a in sys.argv[1:]]
    data_before = {"calib": manifest_fingerprint(args.calib), "eval": manifest_fingerprint(args.eval)}
    results = []
    for job in jobs:
        print(f"=== {job}", flush=True)
        t = time.perf_counter()
        log = Path(args.out) / f"job-{job}.log"
        with open(log, "w") as lf:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--worker", job],
                                stdout=lf, stderr=subprocess.STDOUT).returncode
        jf = Path(args.out) / f"job-{job}.json"
        res = json.loads(jf.read_text()) if jf.exists() else {"job": job, "status": "crashed", "returncode": rc}
        res["log"] = str(log)
        res["job_seconds"] = round(time.perf_counter() - t, 1)
        results.append(res)
        line = f"    {res.get('status')}"
        if "error" in res:
            line += f": {res.get('error_type', '')}: {res['error'].splitlines()[0] if res['error'] else ''}"
        if "oneshot_seconds" in res:
            line += f"; oneshot {res['oneshot_seconds']} s, peak RSS {res['peak_rss_oneshot_mb']} MB"
        if "eval" in res:
            e = res["eval"]
            line += f"; WER {100 * e['wer']:.2f}% " + " ".join(
                f"{k} {100 * v['wer']:.2f}%" for k, v in sorted(e["subsets"].items()))
        print(line, flush=True)

    summary = {
        "benchmark": "llm-compressor GPTQ W4A16 g128 reference",
        "model": args.model, "calib": args.calib, "eval": args.eval,
        "n_calib": args.n_calib, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "data_before": data_before,
        "data_after": {"calib": manifest_fingerprint(args.calib), "eval": manifest_fingerprint(args.eval)},
        "jobs": results,
    }
    if summary["data_before"] != summary["data_after"]:
        print("WARNING: the calibration/eval data changed while the benchmark ran; rerun it", flush=True)
    (Path(args.out) / "result.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {Path(args.out) / 'result.json'}")


if __name__ == "__main__":
    main()
