"""Bit-identity check between two versions of the quantization code.

`save` quantizes one model with every method at 3 and 4 bits (plus a few option variants) on a
few calibration utterances and writes one checkpoint per run, with its per-layer report, under
OUT. `compare` reads two such folders and checks, for every run saved in both (runs saved in
the reference only are listed): every integer tensor (codes, zeros, g_idx) bit for bit, every
floating tensor value for value (a newer format may store an exactly representable float32
tensor as float16: reported, not a difference), every per-layer diagnostic (alpha, rho,
vulnerability, errors) for exact equality, and the quantization_config keys both versions write
(keys a newer version adds are listed).

Use it around a refactor that must not change results:

    git stash; python python/compare_checkpoints.py save --calib CALIB.jsonl --out REF; git stash pop
    python python/compare_checkpoints.py save --calib CALIB.jsonl --out NEW
    python python/compare_checkpoints.py compare REF NEW

Only public entry points are used, so the script runs against older versions of the package.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# (name, QuantConfig keyword arguments). Every method at 3 and 4 bits, and the options that
# take other code paths (act-order, one group per row, symmetric grid, FADE's ablations).
RUNS = [(f"{method}-w{bits}", {"method": method, "bits": bits})
        for method in ("rtn", "gptq", "awq", "awq-gptq", "qep", "qep-rtn", "qep-awq", "fade", "fade-rtn")
        for bits in (3, 4)] + [
    ("gptq-w4-actorder", {"method": "gptq", "bits": 4, "act_order": True}),
    ("gptq-w3-row-sym", {"method": "gptq", "bits": 3, "group_size": -1, "sym": True}),
    ("fade-w3-reliability", {"method": "fade", "bits": 3, "fade_rule": "reliability"}),
    ("qep-w3-actorder", {"method": "qep", "bits": 3, "act_order": True}),
]


def save(args) -> int:
    from fade_kernels.api import quantize_model
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.config import QuantConfig
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.io.checkpoint import save_quantized
    from fade_kernels.models.bundled import load_model_and_processor

    # One thread: a GEMM's rounding depends on how it is split across threads, and the quantized
    # encoder's output (which the decoder's cross-attention statistics read) goes through GEMMs,
    # so checkpoints saved with different thread counts differ in the decoder's codes.
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    utterances = select_subset(load_corpus(args.calib), args.n_calib, args.seed)
    selected = [run for run in RUNS if not args.only or run[0] in args.only]
    for name, kwargs in selected:
        if (out / name / "report.json").is_file():
            print(f"{name}: already saved")
            continue
        torch.manual_seed(args.seed)
        model, processor = load_model_and_processor(args.model)
        samples = prepare_samples(model, processor, utterances, progress=False)
        report = quantize_model(model, samples, QuantConfig(**kwargs), batch_size=args.batch_size, progress=False)
        save_quantized(model, out / name)
        (out / name / "report.json").write_text(json.dumps(report.to_dict()["layers"], indent=1))
        print(f"{name}: {len(report.layers)} layers in {report.seconds:.1f} s")
    return 0


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Integer tensors (codes, zeros, g_idx): same dtype and bits. Floating tensors: the same
    values (a checkpoint format may store an exactly representable float32 tensor as float16)."""
    if a.is_floating_point() and b.is_floating_point():
        return a.shape == b.shape and torch.equal(a.double(), b.double())
    return a.dtype == b.dtype and torch.equal(a, b)


def compare(args) -> int:
    reference, candidate = Path(args.reference), Path(args.candidate)
    names = sorted(p.name for p in reference.iterdir() if (p / "report.json").is_file())
    if not names:
        print(f"no saved runs in {reference}", file=sys.stderr)
        return 2
    failures, missing = 0, []
    for name in names:
        problems = []
        if not (candidate / name / "report.json").is_file():
            missing.append(name)
            continue
        ref_files = sorted(p.name for p in (reference / name).glob("*.safetensors"))
        new_files = sorted(p.name for p in (candidate / name).glob("*.safetensors"))
        if ref_files != new_files:
            problems.append(f"weight files differ: {ref_files} vs {new_files}")
        ref_tensors, new_tensors = {}, {}
        for file in ref_files:
            ref_tensors.update(load_file(reference / name / file))
        for file in new_files:
            new_tensors.update(load_file(candidate / name / file))
        if set(ref_tensors) != set(new_tensors):
            problems.append(f"tensor names differ: {sorted(set(ref_tensors) ^ set(new_tensors))[:5]}")
        differing = [key for key in ref_tensors if key in new_tensors
                     and not same_values(ref_tensors[key], new_tensors[key])]
        if differing:
            problems.append(f"{len(differing)} tensors differ, e.g. {differing[:3]}")
        stored = [key for key in ref_tensors if key in new_tensors and key not in differing
                  and ref_tensors[key].dtype != new_tensors[key].dtype]
        ref_report = json.loads((reference / name / "report.json").read_text())
        new_report = json.loads((candidate / name / "report.json").read_text())
        if ref_report != new_report:
            problems.append("per-layer report differs")
        ref_config = json.loads((reference / name / "config.json").read_text())["quantization_config"]
        new_config = json.loads((candidate / name / "config.json").read_text())["quantization_config"]
        common = sorted(set(ref_config) & set(new_config))
        changed = [key for key in common if ref_config[key] != new_config[key]]
        if changed:
            problems.append(f"quantization_config differs: {changed}")
        status = "identical" if not problems else "DIFFERENT: " + "; ".join(problems)
        if not problems:
            status += f" ({len(ref_tensors)} tensors"
            if stored:
                status += f"; {len(stored)} float tensors stored in another dtype with equal values"
            added = sorted(set(new_config) - set(ref_config))
            if added:
                status += f"; quantization_config gained {added}"
            status += ")"
        print(f"{name}: {status}")
        failures += bool(problems)
    compared = len(names) - len(missing)
    print(f"{compared - failures}/{compared} runs identical" + (f"; not in {candidate}: {', '.join(missing)}"
                                                               if missing else ""))
    return 1 if failures or not compared else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("save", help="quantize with every method and save the checkpoints")
    p.add_argument("--out", required=True, help="folder for the checkpoints (one subfolder per run)")
    p.add_argument("--calib", required=True, help="calibration manifest (.jsonl) or LibriSpeech-style folder")
    p.add_argument("--model", default="bundled:tiny.en")
    p.add_argument("--n-calib", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="run names to save (default: all)")
    p.set_defaults(func=save)
    p = sub.add_parser("compare", help="check two saved folders tensor by tensor")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.set_defaults(func=compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
