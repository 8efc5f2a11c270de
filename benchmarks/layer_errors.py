"""Per-layer error against the full-precision output for every method, on one calibration seed.

`fade sweep` runs the full-precision chain only for the methods that need it (QEP, FADE), so its
error-against-depth plot compares GPTQ's local error with QEP/FADE's error against the
full-precision output. This script quantizes once per method with track_fp_error=True, so every
curve is ||W X - W_hat X_hat|| / ||W X|| on the same calibration rows, and writes the per-layer
reports (JSON) and the plots: error against depth, alpha and rho per layer.

  python benchmarks/layer_errors.py --model bundled:tiny.en --calib devset/calib.jsonl \
      --methods rtn,gptq,awq,qep,fade --bits 3 --seed 0 --n-calib 32 --out runs/layer-errors
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from fade_kernels.api import quantize_model
from fade_kernels.calib.samples import prepare_samples
from fade_kernels.config import QuantConfig
from fade_kernels.data.corpus import load_corpus, select_subset
from fade_kernels.models.bundled import load_model_and_processor
from fade_kernels.report.plots import plot_alpha_per_layer, plot_error_vs_depth, plot_rho_per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:tiny.en")
    parser.add_argument("--calib", required=True, help="calibration manifest (the subset is drawn with --seed)")
    parser.add_argument("--methods", default="rtn,gptq,awq,qep,fade")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--out", default="runs/layer-errors")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, processor = load_model_and_processor(args.model)
    samples = prepare_samples(base, processor, select_subset(load_corpus(args.calib), args.n_calib, args.seed))
    reports = {}
    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        config = QuantConfig(method=method, bits=args.bits, group_size=args.group_size)
        report = quantize_model(model, samples, config, track_fp_error=True)
        reports[method] = report
        fp = [layer.rel_error_fp for layer in report.layers]
        print(f"{method} w{args.bits}: error vs full precision, mean over layers {sum(fp) / len(fp):.4f}, "
              f"last encoder layer {[l.rel_error_fp for l in report.layers if l.stack == 'encoder'][-1]:.4f}, "
              f"last layer {fp[-1]:.4f}; {report.seconds:.0f} s", flush=True)
        del model
    (out / f"reports_w{args.bits}_seed{args.seed}.json").write_text(
        json.dumps({method: report.to_dict() for method, report in reports.items()}, indent=1))
    title = f"{args.model}, {args.bits}-bit g{args.group_size}, seed {args.seed}"
    plot_error_vs_depth(reports, out / f"error_vs_fp_w{args.bits}.png", title=f"error against full precision: {title}")
    propagating = {m: r for m, r in reports.items() if QuantConfig(method=m).propagates}
    if propagating:
        plot_alpha_per_layer(propagating, out / f"alpha_w{args.bits}.png", title=f"alpha per layer: {title}")
        if "fade" in propagating:
            plot_rho_per_layer({"fade": propagating["fade"]}, out / f"rho_w{args.bits}.png", title=f"FADE rho: {title}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
