"""PNG plots of quantization reports and sweep results.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`, no pyplot),
so plotting never touches a global backend or an interactive window and is safe in workers.

A "report" is a QuantizationReport (fade_kernels.api) or its to_dict() form (what results.json stores).
Per-layer plots take one report, a list of reports (e.g. one per seed: the mean is drawn with
the min-max band), or a mapping label -> report or list (one line per label). Layers are in
pipeline order (the order the report lists them: encoder blocks, then decoder blocks); the
encoder and decoder parts of the x axis are shaded in two colours.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["has_field", "plot_alpha_per_layer", "plot_error_vs_depth", "plot_rho_per_layer",
           "plot_wer_per_method_seed", "write_report_plots"]

STACK_COLOURS = {"encoder": "#dbe9f6", "decoder": "#fde6d2"}
STACK_POINT_COLOURS = {"encoder": "#1f77b4", "decoder": "#d95f02"}


def _layers(report: Any) -> list[dict]:
    """Layer dicts of one report (QuantizationReport or its dict form)."""
    if isinstance(report, Mapping):
        layers = report.get("layers")
        if layers is None:
            raise TypeError("a report dict must have a 'layers' list (QuantizationReport.to_dict())")
        return [dict(layer) for layer in layers]
    if hasattr(report, "layers"):
        return [dict(vars(layer)) for layer in report.layers]
    raise TypeError(f"expected a QuantizationReport or its dict, got {type(report).__name__}")


def _is_report(obj: Any) -> bool:
    return hasattr(obj, "layers") or (isinstance(obj, Mapping) and "layers" in obj)


def _series(reports: Any) -> dict[str, list[list[dict]]]:
    """Normalise the accepted inputs to {label: [layers of each report]}."""
    if _is_report(reports):
        return {"": [_layers(reports)]}
    if isinstance(reports, Mapping):
        out = {}
        for label, value in reports.items():
            out[str(label)] = [_layers(value)] if _is_report(value) else [_layers(r) for r in value]
        return out
    if isinstance(reports, Sequence):
        return {"": [_layers(r) for r in reports]}
    raise TypeError("expected a report, a list of reports or a mapping label -> report(s), "
                    f"got {type(reports).__name__}")


def has_field(reports: Any, field: str) -> bool:
    """True when some layer of some report has `field` set (not None)."""
    return any(layer.get(field) is not None for runs in _series(reports).values() for layers in runs
               for layer in layers)


def _stack_of(layer: dict) -> str:
    stack = layer.get("stack") or ""
    if stack:
        return stack
    return "decoder" if "decoder" in layer.get("name", "") else "encoder"


def _matrix(runs: list[list[dict]], field: str | Sequence[str], names: list[str]) -> np.ndarray:
    """(n_reports, n_layers) float with NaN where the value is missing; layers matched by name.
    field: one name, or names tried in order per report (the first one set on every layer)."""
    fields = [field] if isinstance(field, str) else list(field)
    rows = []
    for layers in runs:
        by_name = {layer["name"]: layer for layer in layers}
        chosen = next((f for f in fields if all(by_name[n].get(f) is not None for n in names if n in by_name)),
                      fields[-1])
        rows.append([float(by_name[n][chosen]) if n in by_name and by_name[n].get(chosen) is not None else math.nan
                     for n in names])
    return np.asarray(rows, dtype=np.float64).reshape(len(runs), len(names))


def _new_figure(width: float = 10.0, height: float = 4.0):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _shade_stacks(ax, layers: list[dict]) -> None:
    """Shade each stack's span of the x axis and mark the encoder/decoder boundary."""
    stacks = [_stack_of(layer) for layer in layers]
    start = 0
    for index in range(1, len(stacks) + 1):
        if index == len(stacks) or stacks[index] != stacks[start]:
            ax.axvspan(start - 0.5, index - 0.5, color=STACK_COLOURS.get(stacks[start], "#eeeeee"), zorder=0, lw=0)
            ax.text((start + index - 1) / 2, 1.0, stacks[start], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9)
            if index < len(stacks):
                ax.axvline(index - 0.5, color="0.3", lw=1, ls="--", zorder=1)
            start = index


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _per_layer_plot(reports: Any, path, field: str | Sequence[str], ylabel: str, title: str | None,
                    ylim: tuple[float, float] | None = None, log: bool = False,
                    labels: Mapping[str, str] | None = None) -> Path:
    series = _series(reports)
    reference = next(layers for runs in series.values() for layers in runs if layers)
    names = [layer["name"] for layer in reference]
    x = np.arange(len(names))
    fig = _new_figure(max(8.0, 0.09 * len(names) + 4), 4.2)
    ax = fig.add_subplot()
    _shade_stacks(ax, reference)
    single = len(series) == 1
    plotted = 0
    for index, (label, runs) in enumerate(series.items()):
        values = _matrix(runs, field, names)
        if np.isnan(values).all():
            continue
        plotted += 1
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=0)
        colour = "0.35" if single else f"C{index % 10}"
        name = (labels or {}).get(label, label)
        if len(runs) > 1:
            name = f"{name} (mean of {len(runs)})" if name else f"mean of {len(runs)}"
            ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=colour, alpha=0.2, lw=0)
        ax.plot(x, mean, color=colour, lw=1, label=name or None, zorder=2)
        if single:
            # One series: colour each point by its stack.
            stacks = np.array([_stack_of(layer) for layer in reference])
            for stack, point_colour in STACK_POINT_COLOURS.items():
                keep = stacks == stack
                ax.scatter(x[keep], mean[keep], s=14, color=point_colour, zorder=3, label=stack)
        else:
            ax.scatter(x, mean, s=10, color=colour, zorder=3)
    if not plotted:
        raise ValueError(f"no layer of these reports records {field!r}")
    if log and np.nanmin([np.nanmin(_matrix(r, field, names)) for r in series.values()]) > 0:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("layer (pipeline order)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, pad=16)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_alpha_per_layer(reports: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Propagation strength alpha per layer (LayerReport.alpha) -> PNG at `path`; returns it.
    reports: a report, a list (seeds; mean and min-max band) or {label: report(s)}."""
    return _per_layer_plot(reports, path, "alpha", "alpha", title or "alpha per layer", ylim=(-0.05, 1.05))


def plot_rho_per_layer(reports: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """FADE's cross-fitted reliability rho per layer (LayerReport.rho) -> PNG; returns the path."""
    return _per_layer_plot(reports, path, "rho", "reliability rho", title or "rho per layer", ylim=(-0.05, 1.05))


def plot_error_vs_depth(reports_by_method: Mapping[str, Any], path: str | os.PathLike,
                        title: str | None = None) -> Path:
    """Relative output error per layer in pipeline order, one line per method -> PNG; returns it.

    reports_by_method: {method: report or list of reports (seeds: mean and min-max band)}. A
    method whose layers all record rel_error_fp (||WX - W_hat X_hat|| / ||WX||, against the
    full-precision chain) is drawn with it, otherwise with rel_output_error (the local error on
    the quantized chain's inputs); the legend says which. Log scale when all values are > 0.
    """
    if not isinstance(reports_by_method, Mapping) or not reports_by_method or _is_report(reports_by_method):
        raise TypeError("reports_by_method must be a non-empty mapping {method: report or list of reports}")
    series = _series(reports_by_method)
    labels = {}
    for label, runs in series.items():
        full = all(layer.get("rel_error_fp") is not None for layers in runs for layer in layers)
        labels[label] = f"{label} (vs full precision)" if full else f"{label} (local)"
    return _per_layer_plot(reports_by_method, path, ("rel_error_fp", "rel_output_error"), "relative output error",
                           title or "relative output error against depth", log=True, labels=labels)


def _runs_of(results: Any) -> tuple[list[dict], dict | None]:
    if isinstance(results, Mapping) and "runs" in results:
        runs = results["runs"]
        return list(runs.values()) if isinstance(runs, Mapping) else list(runs), results.get("fp")
    if isinstance(results, Iterable):
        return list(results), None
    raise TypeError("results must be the sweep's results dict (with 'runs') or a list of run records")


def plot_wer_per_method_seed(results: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """WER per method: one point per calibration seed (same colour per seed across methods) and
    the mean with a +- one sample-std bar; one panel per bit width; the fp32 WER as a dashed
    line. results: the sweep's results dict or a list of run records ({method, bits, seed,
    wer}). Writes a PNG at `path` and returns it."""
    from fade_kernels.config import SUPPORTED_METHODS

    runs, fp = _runs_of(results)
    if not runs:
        raise ValueError("no runs to plot")
    widths = sorted({int(run["bits"]) for run in runs}, reverse=True)
    seeds = sorted({run.get("seed") for run in runs if run.get("seed") is not None})
    seed_colour = {seed: f"C{i % 10}" for i, seed in enumerate(seeds)}
    fig = _new_figure(max(6.0, 4.5 * len(widths)), 4.2)
    axes = fig.subplots(1, len(widths), squeeze=False, sharey=True)[0]
    fp_line = None
    for ax, bits in zip(axes, widths):
        mine = [run for run in runs if int(run["bits"]) == bits]
        methods = sorted({run["method"] for run in mine},
                         key=lambda m: SUPPORTED_METHODS.index(m) if m in SUPPORTED_METHODS else 99)
        for position, method in enumerate(methods):
            values = [(run.get("seed"), 100 * run["wer"]) for run in mine if run["method"] == method]
            offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else [0.0]
            for offset, (seed, wer) in zip(offsets, values):
                ax.scatter(position + offset, wer, s=22, color=seed_colour.get(seed, "0.5"), zorder=3,
                           edgecolors="none")
            wers = [wer for _, wer in values]
            mean = float(np.mean(wers))
            std = float(np.std(wers, ddof=1)) if len(wers) > 1 else 0.0
            ax.errorbar(position, mean, yerr=std, fmt="_", color="black", markersize=18, capsize=6, lw=1.5, zorder=4)
        if fp is not None:
            fp_line = ax.axhline(100 * fp["wer"], color="0.4", ls="--", lw=1, label="fp32")
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{bits}-bit")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("WER %")
    handles = [axes[0].scatter([], [], s=22, color=colour, label=f"seed {seed}")
               for seed, colour in seed_colour.items()]
    if any(run.get("seed") is None for run in runs):
        handles.append(axes[0].scatter([], [], s=22, color="0.5", label="data-free (any seed)"))
    if fp_line is not None:
        handles.append(fp_line)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(title or "WER per method and calibration seed (bar: mean ± std)")
    return _save(fig, path)


def write_report_plots(report: Any, out_dir: str | os.PathLike, label: str | None = None) -> list[Path]:
    """The per-layer PNGs of one quantization run into out_dir: error_vs_depth.png, and
    alpha_per_layer.png / rho_per_layer.png when the report records them. Returns the paths."""
    out = Path(out_dir)
    if label is None:
        config = report.get("config", {}) if isinstance(report, Mapping) else getattr(report, "config", {})
        label = str(config.get("method", "run"))
    paths = [plot_error_vs_depth({label: report}, out / "error_vs_depth.png")]
    if has_field(report, "alpha"):
        paths.append(plot_alpha_per_layer(report, out / "alpha_per_layer.png", title=f"alpha per layer ({label})"))
    if has_field(report, "rho"):
        paths.append(plot_rho_per_layer(report, out / "rho_per_layer.png", title=f"rho per layer ({label})"))
    return paths
