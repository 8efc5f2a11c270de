"""End to end on CPU: Whisper encoder time and greedy decoder tokens per second, quantized vs dense.

Models
  tiny.en    bundled:tiny.en (real weights; audio from --manifest, else a seeded synthetic signal)
  large-v3   a large-v3-shaped Whisper with random weights built from its config (d_model 1280,
             32 + 32 layers, 20 heads, ffn 5120, 128 mel bins, vocab 51866; ~6.2 GB in fp32) fed
             seeded random log-mel features: the speed of the real model, not its transcripts
Variants of each model, timed in one run on the same inputs
  fp32       the full-precision model
  w4, w3     every encoder and decoder linear (the pipeline's quantizable layers) replaced by a
             QuantLinear quantized with RTN (group --group-size, asymmetric), backend "cpu"
             (forced: it runs or raises, never a silent fallback to the reference). RTN, not
             GPTQ: the packed layout and the kernels are the same, only the codes differ.
             Token embedding / output projection (tied) and positional tables stay fp32.
  bf16       the whole model cast to bfloat16 (--no-bf16 to skip), timed last
Measurements, per batch size B of --batch
  encoder    wall time of model.model.encoder on one 30 s batch of B utterances (input_features
             (B, n_mels, 3000) -> (B, 1500, d_model))
  decoder    model.generate(encoder_outputs=..., greedy, min_new_tokens = max_new_tokens =
             --tokens, so every variant decodes exactly B * tokens tokens) with the package's
             decode setup (eval/decode.py: suppression masks built once). tokens/s = B * tokens /
             decode time; the first step ("prefill": prompt + cross-attention K/V over 1500 frames)
             and the median later step are reported separately (step times come from a
             logits processor that records when each step's logits arrive).
Each time is the median of --repeats runs (a warm-up call first; the CPU backend's per-layer
repack is done before timing by one call per layer).
Check (per quantized variant): the full pipeline (encoder + generate) through backend "cpu" and
through the torch reference backend on the same inputs must give the same greedy token ids;
reported with the encoder outputs' largest relative difference and the smallest top-1/top-2
logit margin of the run (a near tie is the only way rounding can flip a greedy token). The check
decodes --check-tokens tokens (default --tokens; at most 8 for large-v3, where the reference
dequantizes ~0.8 G weights at every step, ~10 s each) on --check-batch utterances (default: the
largest --batch).

Memory: the large-v3 fp32 model is built once; quantized variants swap QuantLinears in layer by
layer and swap the fp32 linears back afterwards (peak ~ fp32 model + one quantized copy + its CPU
repack, ~8 GB); bf16 is a cast in place at the end.

  python benchmarks/bench_e2e.py --manifest devset/eval.jsonl --json runs/e2e.json --md runs/e2e.md
      # both models, B = 1 and 4, 32 tokens, 3 runs each (estimate: ~40 min on 2 cores, mostly large-v3)
  python benchmarks/bench_e2e.py --quick                # batch 1, 16 tokens, 1 run, no bf16 (~10 min)
  python benchmarks/bench_e2e.py --models tiny.en --batch 1 4 --tokens 32
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time

import numpy as np
import torch

from _common import effective_group, machine_info, machine_line, publish
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.ops import cpu

LARGE_V3 = dict(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
                eos_token_id=50257, pad_token_id=50256, bos_token_id=50257)
# --tiny: a toy Whisper for the smoke test (seconds; the numbers mean nothing). 50 encoder positions
# (100 input frames) instead of 1500 keep it fast.
TOY = dict(vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
           max_target_positions=64, decoder_start_token_id=1, eos_token_id=2, pad_token_id=2, bos_token_id=2)


# ---- models and inputs ----------------------------------------------------------------------

def synthetic_audio(n: int, seconds: float = 8.0, seed: int = 0) -> list[np.ndarray]:
    """n seeded float32 (16000 * seconds,) clips: gliding harmonic tones with bursts, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    clips = []
    for _ in range(n):
        f0 = rng.uniform(100, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voiced = sum(np.sin(h * phase) / h for h in range(1, 6))
        envelope = (np.sin(2 * np.pi * rng.uniform(2, 4) * t) > -0.3).astype(np.float64)
        clip = 0.1 * voiced * envelope + 0.005 * rng.standard_normal(t.size)
        clips.append(clip.astype(np.float32))
    return clips


def random_whisper(settings: dict, seed: int):
    """A WhisperForConditionalGeneration with random weights from `settings` (WhisperConfig kwargs), fp32, eval."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(WhisperConfig(**settings)).eval()


def load_model(name: str, batch: int, args):
    """(model fp32 eval, input_features float32 (batch, n_mels, 3000), description of the inputs)."""
    if name == "tiny.en":
        from fade_kernels.eval.decode import prepare_inputs
        from fade_kernels.models.bundled import load_model_and_processor

        model, processor = load_model_and_processor("bundled:tiny.en")
        if args.manifest:
            from fade_kernels.data.audio import load_audio
            from fade_kernels.data.corpus import load_corpus

            utts = load_corpus(args.manifest)[:batch]
            if len(utts) < batch:
                raise SystemExit(f"--manifest {args.manifest} has {len(utts)} utterances, --batch needs {batch}")
            audios = [load_audio(u.audio) for u in utts]
            source = f"first {batch} utterances of {args.manifest}"
        else:
            audios = synthetic_audio(batch, seed=args.seed)
            source = f"{batch} seeded synthetic 8 s clips (no --manifest)"
        features = prepare_inputs(processor, audios)["input_features"]
        return model, features, source
    settings = dict(LARGE_V3, encoder_layers=args.large_v3_layers, decoder_layers=args.large_v3_layers) \
        if name == "large-v3" else TOY
    model = random_whisper(settings, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    # Log-mel features of real audio lie in about [-1, 1.5] after Whisper's normalisation. The
    # encoder takes exactly 2 * max_source_positions frames (3000 = 30 s for every real Whisper).
    shape = (batch, settings["num_mel_bins"], 2 * settings["max_source_positions"])
    features = torch.randn(*shape, generator=gen) * 0.5
    return model, features, f"seeded random log-mel features {shape}"


def quantizable_names(model) -> list[str]:
    from fade_kernels.models.adapters import get_adapter

    return get_adapter(model).quantizable_names(model)


def swap_in_quantized(model, names: list[str], bits: int, group_size: int) -> dict:
    """Replace each named nn.Linear by an RTN QuantLinear (backend "cpu"), one layer at a time.

    Returns {name: the original nn.Linear} for restore_linears. The CPU repack of each layer is
    made right away (one 1-row call), so that timing never includes it.
    """
    originals = {}

    def make(name, linear):
        originals[name] = linear
        layer = QuantLinear.from_linear(linear, bits=bits, group_size=effective_group(linear.in_features, group_size),
                                        backend="cpu")
        with torch.inference_mode():
            layer(torch.zeros(1, layer.in_features))                 # builds and caches the repack
        return layer

    replace_linears(model, names, make)
    return originals


def step_names(names: list[str]) -> list[str]:
    """The decoder linears read at every decoding step (cross-attention k/v run once, in the prefill)."""
    once = ("encoder_attn.k_proj", "encoder_attn.v_proj")
    return [n for n in names if ".decoder." in f".{n}" and not n.endswith(once)]


def module_megabytes(model, names: list[str]) -> float:
    """MB of the parameters and buffers of the named modules (what a forward through them reads)."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return total / 1e6


def restore_linears(model, originals: dict) -> None:
    replace_linears(model, list(originals), lambda name, module: originals[name])
    gc.collect()


def set_backend(model, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.backend = backend


# ---- timing ---------------------------------------------------------------------------------

class StepTimer:
    """A logits processor that records the time each decoding step's logits arrive (scores unchanged)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class ScoreMargin:
    """A logits processor that keeps the smallest top-1 minus top-2 score of any row and step."""

    def __init__(self):
        self.min_margin = math.inf

    def __call__(self, input_ids, scores):
        top = scores.float().topk(2, dim=-1).values                            # (B, 2)
        margin = (top[:, 0] - top[:, 1]).min().item()
        if math.isfinite(margin):
            self.min_margin = min(self.min_margin, margin)
        return scores


def encode(model, features: torch.Tensor) -> torch.Tensor:
    """(B, n_mels, 3000) -> encoder output (B, 1500, d_model) in the model's dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return model.model.encoder(input_features=features.to(dtype)).last_hidden_state


def greedy(model, encoder_out: torch.Tensor, tokens: int, extra=()) -> tuple[torch.Tensor, StepTimer]:
    """Greedy decode exactly `tokens` new tokens per row from encoder_out (B, 1500, d).

    Returns (ids int64 (B, L), the step timer). Uses the suppression setup of eval/decode.py.
    """
    from transformers import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    from fade_kernels.eval.decode import _generation_setup

    timer = StepTimer()
    with _generation_setup(model) as processors:
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out), min_new_tokens=tokens,
                             max_new_tokens=tokens, do_sample=False, num_beams=1,
                             logits_processor=LogitsProcessorList([*processors, *extra, timer]))
    return getattr(out, "sequences", out), timer


def time_variant(model, features: torch.Tensor, batches: list[int], tokens: int, repeats: int) -> dict:
    """{B: {encoder_s, decode_s, prefill_s, step_ms, tokens_per_s, steady_tokens_per_s, runs}}."""
    out = {}
    with torch.inference_mode():
        encode(model, features[:1, :, :])                                     # warm-up (allocator, GEMM init)
        for b in batches:
            x = features[:b]
            enc_runs, enc = [], None
            for _ in range(repeats):
                t = time.perf_counter()
                enc = encode(model, x)
                enc_runs.append(time.perf_counter() - t)
            greedy(model, enc, 2)                                             # warm-up of the decoder path
            dec_runs, prefill_runs, step_runs = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, timer = greedy(model, enc, tokens)
                dec_runs.append(time.perf_counter() - t0)
                prefill_runs.append(timer.times[0] - t0)
                steps = np.diff(timer.times)
                step_runs.append(float(np.median(steps)) if steps.size else float("nan"))
            dec = statistics.median(dec_runs)
            step = statistics.median(step_runs)
            out[b] = {"encoder_s": statistics.median(enc_runs), "decode_s": dec,
                      "prefill_s": statistics.median(prefill_runs), "step_ms": step * 1e3,
                      "tokens_per_s": b * tokens / dec,
                      "steady_tokens_per_s": b / step if step > 0 else float("nan"),
                      "runs": {"encoder_s": enc_runs, "decode_s": dec_runs}}
            print(f"    B={b}: encoder {out[b]['encoder_s']:.3f} s, decode {dec:.3f} s "
                  f"({out[b]['tokens_per_s']:.1f} tok/s; prefill {out[b]['prefill_s']:.3f} s, "
                  f"step {step * 1e3:.1f} ms)",
                  flush=True)
    return out


def check_reference(model, features: torch.Tensor, tokens: int) -> dict:
    """Greedy ids through backend "cpu" and backend "torch" on the same features (B, n_mels, 3000).

    Returns {"equal", "batch", "tokens", "rows_differing", "first_difference" ([row, position] or
    None), "encoder_max_rel_diff", "min_margin_cpu"}.
    """
    runs = {}
    with torch.inference_mode():
        for backend in ("cpu", "torch"):
            set_backend(model, backend)
            margin = ScoreMargin()
            enc = encode(model, features)
            ids, _ = greedy(model, enc, tokens, extra=(margin,))
            runs[backend] = (enc, ids, margin.min_margin)
    set_backend(model, "cpu")
    (enc_c, ids_c, margin_c), (enc_r, ids_r, _) = runs["cpu"], runs["torch"]
    equal = ids_c.shape == ids_r.shape and torch.equal(ids_c, ids_r)
    first, rows = None, []
    if not equal and ids_c.shape == ids_r.shape:
        diff = (ids_c != ids_r).nonzero().tolist()
        rows = sorted({r for r, _ in diff})
        first = diff[0]
    rel = ((enc_c.float() - enc_r.float()).abs().max() / enc_r.float().abs().max().clamp_min(1e-30)).item()
    return {"equal": bool(equal), "batch": int(features.shape[0]), "tokens": tokens, "rows_differing": rows,
            "first_difference": first, "encoder_max_rel_diff": rel,
            "min_margin_cpu": None if not math.isfinite(margin_c) else margin_c,
            "ids_cpu": ids_c.tolist() if ids_c.numel() <= 4096 else None}


# ---- driver ---------------------------------------------------------------------------------

def run_model(name: str, args) -> dict:
    batch_max = max(args.batch + [args.check_batch])
    t = time.perf_counter()
    model, features, source = load_model(name, batch_max, args)
    build_s = time.perf_counter() - t
    names = quantizable_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(model.get_submodule(n).weight.numel() for n in names)
    print(f"{name}: {n_params / 1e6:.0f} M parameters ({linear_params / 1e6:.0f} M in {len(names)} quantizable "
          f"linears), built in {build_s:.1f} s; inputs: {source}", flush=True)
    check_tokens = args.check_tokens or (min(args.tokens, 8) if name == "large-v3" else args.tokens)
    cfg = model.config
    result = {"model": name, "inputs": source, "parameters": n_params,
              "config": {key: getattr(cfg, key) for key in ("d_model", "encoder_layers", "decoder_layers",
                                                            "encoder_ffn_dim", "vocab_size", "num_mel_bins")},
              "quantized_parameters": linear_params,
              "n_quantized_linears": len(names), "build_s": build_s, "variants": {}, "checks": {}}
    per_step = step_names(names)
    # Bytes a decoding step reads (batch-1 decode is memory-bound): the quantized linears and the
    # output projection (tied to the token embedding), which stays fp32 and bounds the speedup.
    result["decoder_step_weights_mb"] = {"fp32": module_megabytes(model, per_step),
                                         "output_projection_fp32": module_megabytes(model, ["proj_out"])}
    print("  fp32", flush=True)
    result["variants"]["fp32"] = {"timing": time_variant(model, features, args.batch, args.tokens, args.repeats)}
    for bits in args.bits:
        label = f"w{bits}"
        t = time.perf_counter()
        originals = swap_in_quantized(model, names, bits, args.group_size)
        quant_s = time.perf_counter() - t
        result["decoder_step_weights_mb"][label] = module_megabytes(model, per_step)
        print(f"  {label} (RTN + CPU repack in {quant_s:.1f} s)", flush=True)
        result["variants"][label] = {"quantize_s": quant_s,
                                     "timing": time_variant(model, features, args.batch, args.tokens, args.repeats)}
        if not args.no_check:
            check = check_reference(model, features[:args.check_batch], check_tokens)
            result["checks"][label] = check
            print(f"    greedy ids cpu == torch reference: {check['equal']} (batch {check['batch']}, "
                  f"{check['tokens']} tokens; encoder max rel diff {check['encoder_max_rel_diff']:.1e}, "
                  f"min top-2 margin {check['min_margin_cpu']})", flush=True)
        restore_linears(model, originals)
        del originals
        cpu.clear_cache()
        gc.collect()
    if args.bf16:
        model.to(torch.bfloat16)
        print("  bf16", flush=True)
        result["variants"]["bf16"] = {"timing": time_variant(model, features, args.batch, args.tokens, args.repeats)}
    del model
    gc.collect()
    fp = result["variants"]["fp32"]["timing"]
    result["speedup_vs_fp32"] = {
        label: {str(b): {"encoder": fp[b]["encoder_s"] / v["timing"][b]["encoder_s"],
                         "decode": fp[b]["decode_s"] / v["timing"][b]["decode_s"],
                         "decode_step": fp[b]["step_ms"] / v["timing"][b]["step_ms"]} for b in args.batch}
        for label, v in result["variants"].items() if label != "fp32"}
    return result


def summarize(models: dict, bits: list[int], batches: list[int]) -> dict:
    """The end-to-end targets: each quantized variant decodes faster than fp32 (every
    batch size) with the same greedy ids as the reference backend."""
    checks = []
    for name, res in models.items():
        if "skipped" in res:
            continue
        for b in bits:
            label = f"w{b}"
            for batch in batches:
                sp = res["speedup_vs_fp32"][label][str(batch)]["decode"]
                checks.append({"name": f"{name} {label} B={batch}: decode speedup over fp32", "value": sp, "op": ">",
                               "target": 1.0, "status": "PASS" if sp > 1.0 else "FAIL"})
            check = res["checks"].get(label)
            checks.append({"name": f"{name} {label}: greedy ids cpu backend == torch reference",
                           "value": None if check is None else check["equal"], "op": "==", "target": True,
                           "status": "n/a" if check is None else "PASS" if check["equal"] else "FAIL"})
    return {"checks": checks, "n_pass": sum(c["status"] == "PASS" for c in checks),
            "n_fail": sum(c["status"] == "FAIL" for c in checks),
            "all_pass": bool(checks) and all(c["status"] in ("PASS", "n/a") for c in checks)}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [machine_line(result["machine"]), "",
             f"{s['threads']} threads; greedy decoding of exactly {s['tokens']} tokens per utterance; "
             f"RTN g{s['group_size']} asymmetric, backend cpu; median of {s['repeats']} runs.", "",
             *[f"- {name}: {res['parameters'] / 1e6:.0f} M parameters ({res['quantized_parameters'] / 1e6:.0f} M in "
               f"{res['n_quantized_linears']} quantized linears), d_model {res['config']['d_model']}, "
               f"{res['config']['encoder_layers']}+{res['config']['decoder_layers']} layers; inputs: {res['inputs']}; "
               "weights read per decoding step: "
               + ", ".join(f"{key} {mb:.1f} MB" for key, mb in res["decoder_step_weights_mb"].items())
               for name, res in result["models"].items() if "skipped" not in res],
             "",
             "| model | variant | B | encoder s | enc vs fp32 | decode s | tok/s | decode vs fp32 | prefill s | "
             "step ms | step vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in result["models"].items():
        if "skipped" in res:
            lines.append(f"| {name} | skipped: {res['skipped']} | | | | | | | | | |")
            continue
        for label, v in res["variants"].items():
            for b, t in v["timing"].items():
                sp = res["speedup_vs_fp32"].get(label, {}).get(str(b))
                fmt = (lambda key: f"{sp[key]:.2f}x") if sp else (lambda key: "1.00x")
                lines.append(f"| {name} | {label} | {b} | {t['encoder_s']:.3f} | {fmt('encoder')} | "
                             f"{t['decode_s']:.3f} | {t['tokens_per_s']:.1f} | {fmt('decode')} | "
                             f"{t['prefill_s']:.3f} | {t['step_ms']:.1f} | {fmt('decode_step')} |")
    lines += ["", "Greedy ids, backend cpu vs torch reference (same inputs, same quantized model):", ""]
    for name, res in result["models"].items():
        for label, c in res.get("checks", {}).items():
            margin = "n/a" if c["min_margin_cpu"] is None else f"{c['min_margin_cpu']:.3g}"
            lines.append(f"- {name} {label}: {'equal' if c['equal'] else 'DIFFERENT'} (batch {c['batch']}, "
                         f"{c['tokens']} tokens; rows differing {c['rows_differing']}; encoder output max rel diff "
                         f"{c['encoder_max_rel_diff']:.1e}; smallest top-1/top-2 logit margin {margin})")
    summary = result["summary"]
    lines += ["", f"Targets: {summary['n_pass']} PASS, {summary['n_fail']} FAIL", ""]
    for c in summary["checks"]:
        value = "not checked" if c["value"] is None else (f"{c['value']:.2f}x" if isinstance(c["value"], float)
                                                          else str(c["value"]))
        lines.append(f"- {c['status']} {c['name']}: {value}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "large-v3"], choices=["tiny.en", "large-v3"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="utterances per batch")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per utterance (forced length)")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=[3, 4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 variant")
    parser.add_argument("--no-check", action="store_true", help="skip the cpu-vs-reference greedy check")
    parser.add_argument("--check-batch", type=int, default=None, help="batch of the check (default: largest --batch)")
    parser.add_argument("--check-tokens", type=int, default=None,
                        help="tokens of the check (default: --tokens; for large-v3 at most 8, because the torch "
                             "reference dequantizes every weight at every step: ~10 s per large-v3 decoder step)")
    parser.add_argument("--large-v3-layers", type=int, default=32,
                        help="encoder and decoder layers of the large-v3-shaped model (fewer: a quick look only)")
    parser.add_argument("--manifest", help="tiny.en audio: a .jsonl manifest (its first utterances); default synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 1, 16 tokens, 1 run, no bf16")
    parser.add_argument("--tiny", action="store_true",
                        help="a toy random Whisper only, 1 thread (smoke test, seconds; not a measurement)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--md", help="write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick and args.tiny:
        parser.error("--quick and --tiny are exclusive")
    if args.quick:
        args.batch, args.tokens, args.repeats, args.bf16 = [1], 16, 1, False
    if args.tiny:
        # One thread: on a loaded machine a 2-thread OpenMP region waits for a descheduled worker.
        args.models, args.batch, args.tokens, args.repeats, args.threads = ["toy"], [1, 2], 4, 1, 1
    for name, value in (("--batch", min(args.batch)), ("--tokens", args.tokens), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    args.check_batch = args.check_batch or max(args.batch)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ok, why = cpu.cpu_available()
    if not ok:
        raise SystemExit(f"CPU kernels unavailable: {why}")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # generate()'s per-call notices about min/max length and masks
    info = machine_info()
    print(machine_line(info), flush=True)
    models = {}
    for name in args.models:
        try:
            models[name] = run_model(name, args)
        except (ModuleNotFoundError, FileNotFoundError) as exc:  # bundled:tiny.en's package is not installed
            print(f"{name}: skipped ({exc})", flush=True)
            models[name] = {"model": name, "skipped": str(exc)}
        gc.collect()
    result = {"machine": info,
              "settings": {"threads": args.threads, "batch": args.batch, "tokens": args.tokens, "bits": args.bits,
                           "group_size": args.group_size, "repeats": args.repeats, "bf16": args.bf16,
                           "check_batch": args.check_batch, "check_tokens": args.check_tokens,
                           "large_v3_layers": args.large_v3_layers,
                           "preset": "tiny" if args.tiny else "quick" if args.quick else "full",
                           "argv": sys.argv[1:] if argv is None else list(argv)},
              "models": models}
    result["summary"] = summarize(models, args.bits, args.batch)
    # JSON object keys must be strings; batch sizes are ints in the timing dicts.
    for res in models.values():
        for v in res.get("variants", {}).values():
            v["timing"] = {str(b): t for b, t in v["timing"].items()}
    publish(result, markdown(result), args.json, args.md)
    return result


if __name__ == "__main__":
    main()
