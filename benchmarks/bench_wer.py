"""WER of full precision, RTN and GPTQ at 4 and 3 bits on a held-out evaluation manifest.

Calibrates on --calib (a subset of --n-calib utterances drawn with --seed) and evaluates on
--eval, which must not share sentences with --calib (python/make_devset.py splits by sentence).
Also reports quantization wall time, peak RSS and checkpoint size. Writes JSON + markdown.

  python benchmarks/bench_wer.py --model bundled:tiny.en --calib devset/calib.jsonl \
      --eval devset/eval.jsonl --out runs/wer
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fade_kernels.api import quantize_model
from fade_kernels.calib.samples import prepare_samples
from fade_kernels.config import QuantConfig
from fade_kernels.data.corpus import load_corpus, select_subset
from fade_kernels.eval.decode import evaluate
from fade_kernels.io.checkpoint import save_quantized
from fade_kernels.models.bundled import load_model_and_processor


def machine_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:tiny.en")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-utts", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/wer")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base, processor = load_model_and_processor(args.model)
    eval_utts = load_corpus(args.eval)
    calib_utts = select_subset(load_corpus(args.calib), args.n_calib, args.seed)
    overlap = {u.text for u in calib_utts} & {u.text for u in eval_utts}
    if overlap:
        raise SystemExit(f"--calib and --eval share {len(overlap)} sentences; evaluate on held-out speech only")
    samples = prepare_samples(base, processor, calib_utts)

    fp_bytes = sum(p.numel() * 4 for p in base.parameters())
    rows = []
    result = evaluate(base, processor, eval_utts, batch_size=args.batch_size, max_utts=args.max_utts)
    rows.append({"method": "fp32", "bits": 32, "wer": result["wer"], "subsets": result.get("subsets", {}),
                 "rtf": result["rtf"], "quant_seconds": 0.0, "peak_rss_mb": None, "checkpoint_mib": fp_bytes / 2 ** 20})
    print(f"fp32: WER {100 * result['wer']:.2f}%", flush=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            model = copy.deepcopy(base)
            config = QuantConfig(method=method, bits=bits, group_size=args.group_size)
            start = time.perf_counter()
            report = quantize_model(model, samples, config, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                save_quantized(model, Path(tmp) / "ckpt", processor=processor)
                size = directory_mib(Path(tmp) / "ckpt")
            result = evaluate(model, processor, eval_utts, batch_size=args.batch_size, max_utts=args.max_utts)
            errors = [layer.rel_output_error for layer in report.layers]
            rows.append({"method": method, "bits": bits, "wer": result["wer"], "subsets": result.get("subsets", {}),
                         "rtf": result["rtf"], "quant_seconds": seconds,
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "checkpoint_mib": size, "mean_layer_error": sum(errors) / len(errors)})
            print(f"{method} w{bits}: WER {100 * result['wer']:.2f}%  quantize {seconds:.1f} s  "
                  f"checkpoint {size:.1f} MiB", flush=True)

    meta = {"machine": machine_name(), "threads": torch.get_num_threads(), "model": args.model,
            "calib": args.calib, "eval": args.eval, "n_calib": len(calib_utts), "n_eval": len(eval_utts),
            "seed": args.seed, "group_size": args.group_size, "torch": torch.__version__}
    (out / "wer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    subsets = sorted({name for row in rows for name in row["subsets"]})
    lines = [f"Model {args.model}; calibration {len(calib_utts)} utts of {args.calib} (seed {args.seed}); "
             f"evaluation {len(eval_utts)} utts of {args.eval}; g{args.group_size}; {meta['machine']}, "
             f"{meta['threads']} threads.", "",
             "| method | bits | WER % | " + " | ".join(f"{s} WER %" for s in subsets)
             + " | quantize s | process peak RSS MB (cumulative) | checkpoint MiB |",
             "|---|---|---|" + "---|" * len(subsets) + "---|---|---|"]
    for row in rows:
        per_subset = " | ".join(f"{100 * row['subsets'][s]['wer']:.2f}" if s in row["subsets"] else "-" for s in subsets)
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "-"
        lines.append(f"| {row['method']} | {row['bits']} | {100 * row['wer']:.2f} | {per_subset} | "
                     f"{row['quant_seconds']:.1f} | {rss} | {row['checkpoint_mib']:.1f} |")
    (out / "wer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
