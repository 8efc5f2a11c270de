"""Multi-seed sweep: methods x bit widths x calibration seeds on one model.

Lifecycle of `run_sweep`:
  1. load the full-precision model once and decode the evaluation set once with it (its WER
     does not depend on the calibration seed);
  2. per seed: draw the calibration subset from the calibration manifest (select_subset with
     that seed) and turn it into samples once, shared by every method and bit width;
  3. per (method, bits): deep-copy the full-precision model, quantize it (wall time and peak
     memory measured around quantize_model only), measure weight memory and the weight bytes
     read per decoded token, decode the evaluation set, and append the run to results.json
     (temp file + rename, so an interrupted sweep never leaves a torn file);
  4. write results.md (WER mean +- std over seeds per method and bits, overall and per subset,
     cost columns) and the plots under plots/.

A rerun with the same output folder skips every run already in results.json (so a long sweep
can be resumed or extended with more seeds, methods or bit widths), provided the settings that
change results (model, group size, manifests, n_calib, ...) are the same.

Data-free methods (RTN) give the same model for every seed: they are run once per bit width
(seed "any") instead of once per seed.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fade_kernels.atomic import atomic_write_json, atomic_write_text
from fade_kernels.config import SUPPORTED_BITS, SUPPORTED_METHODS, QuantConfig
from fade_kernels.memory.mapped import c_library

__all__ = ["DATA_FREE_METHODS", "PeakMemory", "decode_bytes_per_token", "run_key", "run_sweep",
           "silence_samples", "summarize", "weight_memory", "write_markdown"]

RESULTS_FORMAT = 1
DATA_FREE_METHODS = ("rtn",)
# Settings recorded in results.json that a resumed sweep must share with the stored runs.
_SETTING_KEYS = ("model", "group_size", "calib", "eval", "n_calib", "max_eval", "max_new_tokens",
                 "config_kwargs", "dequantize_eval", "augment")
MB = 1e6  # tables use decimal megabytes


def run_key(method: str, bits: int, seed: int | None) -> str:
    """The results.json key of one configuration; data-free methods have one run per bit width."""
    return f"{method}/w{bits}/seed{'any' if method in DATA_FREE_METHODS or seed is None else seed}"


# --------------------------------------------------------------------------- memory and bytes


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _unique_tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """Parameters and buffers of `module`, each storage once (tied weights counted once)."""
    seen, out = set(), []
    for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _quant_linear_bytes(module: nn.Module, with_g_idx: bool = True) -> int:
    """qweight + qzeros + scales (+ g_idx) + bias of one QuantLinear."""
    names = ("qweight", "qzeros", "scales", "g_idx", "bias") if with_g_idx else ("qweight", "qzeros", "scales", "bias")
    return sum(_tensor_bytes(getattr(module, name, None)) for name in names)


def _module_weight_bytes(module: nn.Module, with_g_idx: bool = True) -> int:
    from fade_kernels.nn.quant_linear import QuantLinear

    if isinstance(module, QuantLinear):
        return _quant_linear_bytes(module, with_g_idx)
    return sum(_tensor_bytes(t) for t in _unique_tensors(module, recurse=False))


def weight_memory(model: nn.Module, adapter=None) -> dict:
    """Bytes of weights held by `model`.

    Returns {"linears_bytes": the layers the pipeline quantizes (adapter.quantizable_names), as
    they are now: QuantLinear qweight + qzeros + scales + g_idx + bias, or nn.Linear weight + bias;
    "quantized_bytes": the same sum over QuantLinear modules only; "n_quantized": their number;
    "model_bytes": every parameter and buffer of the model, tied tensors counted once}.
    """
    from fade_kernels.models.adapters import get_adapter
    from fade_kernels.nn.quant_linear import QuantLinear

    adapter = adapter or get_adapter(model)
    modules = dict(model.named_modules())
    linears = sum(_module_weight_bytes(modules[name]) for name in adapter.quantizable_names(model))
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return {"linears_bytes": linears, "quantized_bytes": sum(_quant_linear_bytes(m) for m in quantized),
            "n_quantized": len(quantized), "model_bytes": sum(_tensor_bytes(t) for t in _unique_tensors(model))}


def decode_bytes_per_token(model: nn.Module, adapter=None) -> dict:
    """Weight bytes read from memory to decode one token (batch 1, with a key/value cache).

    Counted: every decoder-layer weight a decoding step touches (self-attention q/k/v/out,
    cross-attention q and out, the MLP, layer norms; quantized layers as qweight + qzeros +
    scales + bias: the kernels derive the group from the column index and never read g_idx), one
    row of each embedding table (token, learned positions), and the whole output projection
    (it scores every vocabulary entry, even when tied to the token embedding).
    Not counted: cross-attention k/v projections (computed once per utterance from the encoder
    output, reported as "cross_kv_bytes_per_utterance"), the encoder, activations and the cache.
    Returns bytes: {"decoder_layers", "embedding_rows", "output_projection", "total",
    "cross_kv_bytes_per_utterance"}.
    """
    from fade_kernels.models.adapters import ENCODER_FRAMES, get_adapter

    adapter = adapter or get_adapter(model)
    decoder = adapter.decoder(model)
    names = {module: name for name, module in model.named_modules()}
    layers = adapter.decoder_layers(model)
    cross_kv = {f"{names[layers]}.{index}.{name}" for index in range(len(layers))
                for group in adapter.decoder_groups if group.mask == ENCODER_FRAMES for name in group.names}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layer_bytes = emb_bytes = cross_bytes = 0
    for module in decoder.modules():
        name = names[module]
        if module is head:
            continue
        if isinstance(module, nn.Embedding):
            # One row per token (Whisper's learned positions are an nn.Embedding subclass).
            emb_bytes += module.embedding_dim * module.weight.element_size()
        elif name in cross_kv:
            cross_bytes += _module_weight_bytes(module, with_g_idx=False)
        else:
            # Only the module's own tensors: children are visited by the loop themselves.
            layer_bytes += _module_weight_bytes(module, with_g_idx=False)
    head_bytes = 0 if head is None else _module_weight_bytes(head, with_g_idx=False)
    return {"decoder_layers": layer_bytes, "embedding_rows": emb_bytes, "output_projection": head_bytes,
            "total": layer_bytes + emb_bytes + head_bytes, "cross_kv_bytes_per_utterance": cross_bytes}


def _malloc_trim() -> None:
    # Hand freed heap pages back to the OS so the RSS at the start of a measurement is not
    # inflated by what earlier configurations freed (glibc keeps small freed blocks).
    try:
        c_library().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


class PeakMemory:
    """Peak resident memory of the process inside a `with` block, per block.

    Linux: writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the
    current RSS, so VmHWM read at exit is the peak reached inside the block even though the
    process-lifetime peak (getrusage ru_maxrss) is monotone. Before the reset, garbage is
    collected and malloc_trim returns freed heap to the OS. Attributes after exit (MiB):
    start_mb (RSS at entry), peak_mb (peak RSS inside the block, whole process), increase_mb =
    peak_mb - start_mb, method (how it was measured). Without /proc (not Linux), peak_mb is the
    process-lifetime ru_maxrss and increase_mb is None.
    """

    def __init__(self) -> None:
        self.start_mb = self.peak_mb = 0.0
        self.increase_mb: float | None = None
        self.method = ""
        self._per_block = False

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._per_block = True
            self.method = "peak VmHWM after a /proc/self/clear_refs reset"
        except OSError:
            self.method = "ru_maxrss (process-lifetime peak, not per configuration)"
        self.start_mb = _status_mb("VmRSS") or 0.0
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_mb("VmHWM") if self._per_block else None
        if hwm is None:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.increase_mb = None
        else:
            self.peak_mb = hwm
            self.increase_mb = max(0.0, hwm - self.start_mb)


# --------------------------------------------------------------------------- results file


def _machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _load_results(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"format": RESULTS_FORMAT, "settings": settings, "meta": {}, "calibration": {}, "fp": None,
                "runs": {}}
    data = json.loads(path.read_text())
    stored = data.get("settings", {})
    differ = [f"{key}: stored {stored.get(key)!r} != now {settings.get(key)!r}" for key in _SETTING_KEYS
              if json.dumps(stored.get(key), sort_keys=True) != json.dumps(settings.get(key), sort_keys=True)]
    if differ:
        raise ValueError(f"{path} holds a sweep with different settings ({'; '.join(differ)}); "
                         "use another output folder")
    data.setdefault("runs", {})
    data.setdefault("calibration", {})
    return data


# --------------------------------------------------------------------------- summary and table


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std None for a single value."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(results: dict) -> list[dict]:
    """One row per (method, bits) in first-run order: n (runs), seeds, wer_mean, wer_std (sample
    std over seeds, None when n = 1), wers (per run), subsets {name: {mean, std}},
    quant_seconds_mean, rss_increase_mb_mean, linears_mb, model_mb, bytes_per_token_mb."""
    groups: dict[tuple, list[dict]] = {}
    for run in results.get("runs", {}).values():
        groups.setdefault((run["method"], run["bits"]), []).append(run)
    rows = []
    for (method, bits), runs in groups.items():
        wer_mean, wer_std = _mean_std([r["wer"] for r in runs])
        names = sorted({name for r in runs for name in r.get("subsets", {})})
        subsets = {}
        for name in names:
            mean, std = _mean_std([r["subsets"][name]["wer"] for r in runs if name in r.get("subsets", {})])
            subsets[name] = {"mean": mean, "std": std}
        increases = [r["rss_increase_mb"] for r in runs if r.get("rss_increase_mb") is not None]
        rows.append({
            "method": method, "bits": bits, "n": len(runs), "seeds": [r["seed"] for r in runs],
            "wers": [r["wer"] for r in runs], "wer_mean": wer_mean, "wer_std": wer_std, "subsets": subsets,
            "quant_seconds_mean": statistics.fmean(r["quant_seconds"] for r in runs),
            "rss_increase_mb_mean": statistics.fmean(increases) if increases else None,
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            "linears_mb": runs[0]["weight_memory"]["linears_bytes"] / MB,
            "model_mb": runs[0]["weight_memory"]["model_bytes"] / MB,
            "bytes_per_token_mb": runs[0]["bytes_per_token"]["total"] / MB,
        })
    rows.sort(key=lambda row: (-row["bits"], _method_order(row["method"])))
    return rows


def _method_order(method: str) -> int:
    return SUPPORTED_METHODS.index(method) if method in SUPPORTED_METHODS else len(SUPPORTED_METHODS)


def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def write_markdown(results: dict, path: Path, plots: Sequence[Path] = ()) -> str:
    """Write the WER and cost table of `results` (the results.json dict) to `path`; returns it."""
    settings, meta, fp = results["settings"], results.get("meta", {}), results.get("fp")
    rows = summarize(results)
    subset_names = sorted({name for row in rows for name in row["subsets"]} | set((fp or {}).get("subsets", {})))
    n_eval = (fp or {}).get("n_utts", "?")
    lines = [
        f"# Sweep: {settings['model']}, group {settings['group_size']}",
        "",
        f"Calibration: {settings['n_calib']} utterances of `{settings['calib']}` drawn per seed; evaluation: "
        f"{n_eval} utterances of `{settings['eval']}`; greedy decoding, at most {settings['max_new_tokens']} new "
        f"tokens. Machine: {meta.get('machine', '?')}, {meta.get('threads', '?')} threads, torch "
        f"{meta.get('torch', '?')}.",
        "",
        "WER % as mean ± sample standard deviation over calibration seeds (n runs); data-free methods (RTN) "
        "give one model for all seeds (n = 1). Quantize s: wall time of quantize_model (× GPTQ time: the same "
        "over GPTQ's at that width). RSS +MB: increase of "
        f"the process's resident memory during quantization ({meta.get('memory_method', 'see results.json')}). "
        "Linears MB: the quantized layers' storage (qweight + qzeros + scales + g_idx + bias; fp32 weight + "
        "bias for the fp row); model MB: all weights, tied tensors once (1 MB = 10^6 bytes). Bytes/token MB: "
        "weights read per decoded token at batch 1 with a cache: decoder self-attention, cross-attention q "
        "and out, MLP and norms, one row of each embedding table, and the whole output projection; the "
        "cross-attention k/v projections run once per utterance and are excluded."
        + (" Evaluation ran the quantized layers as dense float32 linears on their dequantized weights "
           "(same model, faster on CPU)." if settings.get("dequantize_eval") else ""),
        "",
        "| method | bits | n | WER % | " + " | ".join(f"{name} WER %" for name in subset_names)
        + " | quantize s | × GPTQ time | RSS +MB | linears MB | model MB | bytes/token MB |",
        "|---|---|---|---|" + "---|" * len(subset_names) + "---|---|---|---|---|---|",
    ]
    if fp:
        per_subset = " | ".join(_pct(fp["subsets"][n]["wer"], None) if n in fp["subsets"] else "-"
                                for n in subset_names)
        memory = fp["weight_memory"]
        lines.append(f"| fp32 | 32 | 1 | {_pct(fp['wer'], None)} | {per_subset} | - | - | - | "
                     f"{memory['linears_bytes'] / MB:.1f} | {memory['model_bytes'] / MB:.1f} | "
                     f"{fp['bytes_per_token']['total'] / MB:.2f} |")
    gptq_seconds = {row["bits"]: row["quant_seconds_mean"] for row in rows if row["method"] == "gptq"}
    for row in rows:
        per_subset = " | ".join(_pct(row["subsets"][n]["mean"], row["subsets"][n]["std"])
                                if n in row["subsets"] else "-" for n in subset_names)
        rss = f"{row['rss_increase_mb_mean']:.0f}" if row["rss_increase_mb_mean"] is not None else "-"
        ratio = (f"{row['quant_seconds_mean'] / gptq_seconds[row['bits']]:.2f}"
                 if gptq_seconds.get(row["bits"]) else "-")
        lines.append(f"| {row['method']} | {row['bits']} | {row['n']} | {_pct(row['wer_mean'], row['wer_std'])} | "
                     f"{per_subset} | {row['quant_seconds_mean']:.1f} | {ratio} | {rss} | {row['linears_mb']:.1f} | "
                     f"{row['model_mb']:.1f} | {row['bytes_per_token_mb']:.2f} |")
    failed = results.get("failed", {})
    if failed:
        lines += ["", "Failed runs (retried by a rerun):", ""] + [f"- `{key}`: {msg}" for key, msg in failed.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


# --------------------------------------------------------------------------- the sweep


def silence_samples(model, processor, seconds: float = 1.0):
    """One calibration sample of silence: enough for the pipeline of a data-free method (RTN's
    codes do not depend on it; only its report's output errors do)."""
    import numpy as np

    from fade_kernels.calib.samples import CalibSample
    from fade_kernels.models.adapters import get_adapter

    adapter = get_adapter(model)
    audio = np.zeros(int(16000 * seconds), dtype=np.float32)
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    prompt = adapter.decoder_prompt(model, processor.tokenizer) + [model.config.eos_token_id]
    return [CalibSample(features[adapter.encoder_input_name()][0].float(), len(audio), torch.tensor(prompt))]


def _resolved(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _eval_record(result: dict) -> dict:
    keep = ("wer", "n_scored", "n_unlabelled", "ref_words", "substitutions", "deletions", "insertions", "subsets",
            "n_utts", "audio_seconds", "decode_seconds", "rtf")
    record = {key: result[key] for key in keep if key in result}
    record["hyps"] = {u["id"]: u["hyp"] for u in result.get("utterances", [])}
    return record


def run_sweep(model_id: str, methods: Sequence[str], bits_list: Sequence[int], group_size: int,
              seeds: Sequence[int], calib_manifest: str | os.PathLike | None, eval_manifest: str | os.PathLike,
              out_dir: str | os.PathLike, n_calib: int = 64, max_eval: int | None = None, batch_size: int = 8,
              eval_batch_size: int = 16, max_new_tokens: int = 128, dequantize_eval: bool = True,
              config_kwargs: dict | None = None, progress: bool = True, plots: bool = True,
              model_and_processor: tuple | None = None, augmentations: Sequence[str] = ()) -> dict:
    """Quantize `model_id` with every method x bits x seed, evaluate WER, and write results.

    methods: names from config.SUPPORTED_METHODS; bits_list: widths from SUPPORTED_BITS; seeds:
    calibration seeds (one subset of n_calib utterances of calib_manifest per seed, drawn with
    data.select_subset). calib_manifest may be None only when every method is data-free.
    eval_manifest: scored utterances (the first max_eval of them if given); it must share no
    transcript with the calibration manifest. batch_size: calibration batch; eval_batch_size:
    decoding batch (16 decoded tiny.en 1.5-1.9x faster than 8 on the 2-core VM, same hypotheses).
    dequantize_eval: decode with the quantized layers as dense linears on their
    dequantized weights (eval.decode.dequantized_linears; same WER up to float rounding, much
    faster on CPU); False runs the packed QuantLinear backends. config_kwargs: extra QuantConfig
    fields (alpha, qep_damp, qep_exclude, fade_rule, awq_grid, sym, act_order, damp, ...).
    model_and_processor: an already-loaded (float32 model, processor) to use instead of loading
    model_id (which then only labels the results). augmentations: names from
    calib.augment.AUGMENTATIONS; each adds a perturbed copy of every calibration clip (drawn with
    the seed), see calib.samples.prepare_samples.
    Writes out_dir/results.json (incrementally), out_dir/results.md and out_dir/plots/*.png.
    Returns the results dict (see results.json: settings, meta, calibration {seed: ids}, fp, runs
    {run_key: record}, failed {run_key: error}).
    """
    from tqdm.auto import tqdm

    from fade_kernels import api
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.data.audio import load_audio
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.eval.decode import evaluate
    from fade_kernels.models.adapters import get_adapter

    methods, bits_list, seeds = list(methods), [int(b) for b in bits_list], [int(s) for s in seeds]
    config_kwargs = dict(config_kwargs or {})
    unknown = [m for m in methods if m not in SUPPORTED_METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty list from {SUPPORTED_METHODS}, got {methods}")
    if not bits_list or any(b not in SUPPORTED_BITS for b in bits_list):
        raise ValueError(f"bits_list must be a non-empty list from {SUPPORTED_BITS}, got {bits_list}")
    if not seeds:
        raise ValueError("seeds must list at least one calibration seed")
    if n_calib < 1:
        raise ValueError(f"n_calib must be at least 1, got {n_calib}")
    if max_eval is not None and max_eval < 1:
        raise ValueError(f"max_eval must be at least 1, got {max_eval}")
    needs_calib = any(m not in DATA_FREE_METHODS for m in methods)
    if needs_calib and calib_manifest is None:
        raise ValueError(f"calib_manifest is required for methods {[m for m in methods if m not in DATA_FREE_METHODS]}")
    # Validate every configuration before hours of work start.
    configs = {(m, b): QuantConfig(method=m, bits=b, group_size=group_size, **config_kwargs)
               for b in bits_list for m in methods}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    settings = {"model": str(model_id), "group_size": group_size, "calib": _resolved(calib_manifest),
                "eval": _resolved(eval_manifest), "n_calib": n_calib, "max_eval": max_eval,
                "max_new_tokens": max_new_tokens, "config_kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                                                   for k, v in sorted(config_kwargs.items())},
                "dequantize_eval": dequantize_eval}
    if augmentations:   # absent otherwise, so sweeps written before the option resume
        settings["augment"] = list(augmentations)
    results = _load_results(results_path, settings)
    results["meta"].update({"machine": _machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()})
    failed: dict[str, str] = results.setdefault("failed", {})

    eval_utts = load_corpus(eval_manifest)[: max_eval]
    calib_utts = load_corpus(calib_manifest) if calib_manifest is not None else []
    shared = {u.text for u in calib_utts if u.text} & {u.text for u in eval_utts if u.text}
    if shared:
        raise ValueError(f"the calibration and evaluation manifests share {len(shared)} transcripts "
                         f"(e.g. {sorted(shared)[0]!r}); evaluate on held-out speech only")
    # Runs still missing, per seed; a data-free run (one key for all seeds) goes to the first seed.
    todo: dict[int, list[tuple[str, int]]] = {seed: [] for seed in seeds}
    planned = set(results["runs"])
    for seed in seeds:
        for bits in bits_list:
            for method in methods:
                key = run_key(method, bits, seed)
                if key not in planned:
                    planned.add(key)
                    todo[seed].append((method, bits))
    total = sum(len(v) for v in todo.values())
    print(f"sweep {model_id}: {len(methods)} methods x {len(bits_list)} widths x {len(seeds)} seeds; "
          f"{len(results['runs'])} runs done, {total} to run -> {out}", flush=True)

    if total == 0 and results.get("fp") is not None:
        # Everything is done: only the table and the plots are rewritten.
        plot_paths = write_plots(results, out / "plots") if plots else []
        write_markdown(results, out / "results.md", plot_paths)
        return results
    if model_and_processor is not None:
        fp_model, processor = model_and_processor
    else:
        from fade_kernels.models.bundled import load_model_and_processor

        fp_model, processor = load_model_and_processor(model_id)
    fp_model.eval()
    adapter = get_adapter(fp_model)
    eval_audios = [load_audio(u.audio) for u in eval_utts]
    eval_kwargs = dict(batch_size=eval_batch_size, max_new_tokens=max_new_tokens, progress=progress,
                       audios=eval_audios)

    if results.get("fp") is None:
        result = evaluate(fp_model, processor, eval_utts, **eval_kwargs)
        results["fp"] = {**_eval_record(result), "weight_memory": weight_memory(fp_model, adapter),
                         "bytes_per_token": decode_bytes_per_token(fp_model, adapter)}
        atomic_write_json(results_path, results, default=str)
        print(f"fp32: WER {100 * result['wer']:.2f}% on {result['n_utts']} utterances "
              f"(decode {result['decode_seconds']:.0f} s)", flush=True)

    bar = tqdm(total=total, desc="sweep", unit="run", disable=not progress)
    for seed in seeds:
        if not todo[seed]:
            continue
        if calib_utts:
            # Data-free runs still get the real subset, so their reports' output errors mean something.
            subset = select_subset(calib_utts, n_calib, seed)
            samples = prepare_samples(fp_model, processor, subset, adapter=adapter, progress=progress,
                                      augmentations=tuple(augmentations), seed=seed)
            results["calibration"][str(seed)] = [u.id for u in subset]
        else:
            samples = silence_samples(fp_model, processor)
        for method, bits in todo[seed]:
            key = run_key(method, bits, seed)
            bar.set_postfix_str(key)
            try:
                config = configs[(method, bits)] if calib_utts else configs[(method, bits)].without_calibration_data()
                record = _run_one(api, fp_model, processor, adapter, samples, config, seed,
                                  batch_size, eval_utts, eval_kwargs, dequantize_eval, progress)
            except (ValueError, NotImplementedError, RuntimeError) as error:
                # One broken configuration must not cost the rest of a long sweep; a rerun retries it.
                failed[key] = f"{type(error).__name__}: {error}"
                print(f"{key}: FAILED {failed[key]}", flush=True)
            else:
                record["seed"] = None if method in DATA_FREE_METHODS else seed
                results["runs"][key] = record
                results["meta"]["memory_method"] = record["memory_method"]
                failed.pop(key, None)
                rss = "" if record["rss_increase_mb"] is None else f", RSS +{record['rss_increase_mb']:.0f} MB"
                print(f"{key}: WER {100 * record['wer']:.2f}%  quantize {record['quant_seconds']:.1f} s{rss}",
                      flush=True)
            atomic_write_json(results_path, results, default=str)
            bar.update(1)
        del samples
        gc.collect()
    bar.close()

    plot_paths = write_plots(results, out / "plots") if plots else []
    write_markdown(results, out / "results.md", plot_paths)
    return results


def _run_one(api, fp_model, processor, adapter, samples, config: QuantConfig, seed: int, batch_size: int,
             eval_utts, eval_kwargs: dict, dequantize_eval: bool, progress: bool) -> dict:
    """Quantize a copy of fp_model with `config` on `samples`, measure it and evaluate it."""
    from fade_kernels.eval.decode import evaluate

    model = copy.deepcopy(fp_model)
    torch.manual_seed(seed)
    with PeakMemory() as memory:
        start = time.perf_counter()
        report = api.quantize_model(model, samples, config, batch_size=batch_size, adapter=adapter, progress=progress)
        seconds = time.perf_counter() - start
    record = {"method": config.method, "bits": config.bits, "group_size": config.group_size,
              "config": config.to_dict(), "n_calib": len(samples), "quant_seconds": seconds,
              "average_bits": report.average_bits,
              "peak_rss_mb": memory.peak_mb, "rss_increase_mb": memory.increase_mb, "memory_method": memory.method,
              "weight_memory": weight_memory(model, adapter), "bytes_per_token": decode_bytes_per_token(model, adapter)}
    result = evaluate(model, processor, eval_utts, dequantize=dequantize_eval, **eval_kwargs)
    record.update(_eval_record(result))
    record["report"] = report.to_dict()
    del model
    gc.collect()
    return record


def write_plots(results: dict, plot_dir: Path) -> list[Path]:
    """The sweep's PNGs: WER per method and seed, and per bit width the relative output error
    against depth (mean over seeds per method), alpha and rho per layer where recorded."""
    from fade_kernels.report import plots

    plot_dir.mkdir(parents=True, exist_ok=True)
    runs = list(results.get("runs", {}).values())
    if not runs:
        return []
    paths = [plots.plot_wer_per_method_seed(results, plot_dir / "wer_per_method_seed.png")]
    for bits in sorted({run["bits"] for run in runs}, reverse=True):
        by_method: dict[str, list[dict]] = {}
        for run in runs:
            if run["bits"] == bits and run.get("report"):
                by_method.setdefault(run["method"], []).append(run["report"])
        if not by_method:
            continue
        paths.append(plots.plot_error_vs_depth(by_method, plot_dir / f"error_vs_depth_w{bits}.png",
                                               title=f"relative output error per layer, {bits}-bit"))
        for field, fn in (("alpha", plots.plot_alpha_per_layer), ("rho", plots.plot_rho_per_layer)):
            having = {m: reps for m, reps in by_method.items() if plots.has_field(reps, field)}
            if having:
                paths.append(fn(having, plot_dir / f"{field}_per_layer_w{bits}.png",
                                title=f"{field} per layer, {bits}-bit"))
    return paths
