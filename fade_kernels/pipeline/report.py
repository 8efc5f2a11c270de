"""The records a quantization run returns: one LayerReport per linear, one QuantizationReport per run."""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """Diagnostics of one quantized linear layer, all measured on the calibration rows.

    rel_output_error: local error sqrt(tr(dW H dW^T) / tr(W H W^T)) with dW = W - W_hat and H the
      quantized chain's input Gram matrix (what GPTQ minimises).
    The fields below need the full-precision chain (QEP/FADE, or track_fp_error=True); else None:
    rel_error_fp: ||W X - W_hat X_hat|| / ||W X||, the error against the full-precision output.
    rel_error_fp_uncorrected: the same for the alpha = 0 solution (plain GPTQ/RTN of W), i.e.
      "before" the correction; equals rel_error_fp when alpha = 0.
    propagated_error: ||W delta|| / ||W X||, the upstream error this layer inherits (delta = X - X_hat).
    alpha: propagation strength used; rho: FADE's cross-fitted reliability in [0, 1];
    vulnerability: FADE's grid-noise term q(alpha) / q(0) at the chosen alpha (1.0 at alpha = 0).
    """

    name: str
    shape: tuple[int, int]
    rel_output_error: float
    valid_row_fraction: float
    stack: str = ""
    block: int = -1
    rel_error_fp: float | None = None
    rel_error_fp_uncorrected: float | None = None
    propagated_error: float | None = None
    alpha: float | None = None
    rho: float | None = None
    vulnerability: float | None = None


@dataclass
class QuantizationReport:
    """config: QuantConfig.to_dict(); layers in solve order; seconds: wall time of this call;
    peak_rss_mb: process-lifetime peak RSS; stage_seconds: exclusive seconds per pipeline stage
    (timing.StageTimer.STAGES); resumed_blocks: blocks restored from a resume folder instead of being
    quantized by this call; offloaded_mb: activation cache bytes written to disk (max_memory);
    released_mb: pages of memory-mapped dense weights handed back after their blocks were packed.
    average_bits: mean stored bits per quantized weight, scales and zero points included
    (pipeline/bit_allocation.bits_per_weight); layer_bits: {full name: bits} of a mixed-precision
    plan (empty without config.avg_bits)."""

    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    n_calib: int = 0
    stage_seconds: dict = field(default_factory=dict)
    resumed_blocks: int = 0
    offloaded_mb: float = 0.0
    released_mb: float = 0.0
    average_bits: float | None = None
    layer_bits: dict = field(default_factory=dict)

    def summary(self) -> str:
        errors = [layer.rel_output_error for layer in self.layers]
        widths = ""
        if self.layer_bits:
            counts = {b: sum(1 for v in self.layer_bits.values() if v == b) for b in sorted(set(self.layer_bits.values()))}
            widths = " (" + ", ".join(f"{n} layers at {b} bits" for b, n in counts.items()) + ")"
        mean = sum(errors) / max(len(errors), 1)
        lines = [f"quantized {len(self.layers)} linear layers with {self.config['method']} "
                 f"{self.config['bits']}-bit g{self.config['group_size']} on {self.n_calib} utterances "
                 f"in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB",
                 *([f"average {self.average_bits:.4f} bits per weight with scales and zero points{widths}"]
                   if self.average_bits is not None else []),
                 f"relative output error: mean {mean:.4f}, max {max(errors, default=0):.4f}"]
        fp_errors = [layer.rel_error_fp for layer in self.layers if layer.rel_error_fp is not None]
        if fp_errors:
            lines.append(f"error against the full-precision output: mean {sum(fp_errors) / len(fp_errors):.4f}, "
                         f"last layer {fp_errors[-1]:.4f}")
        alphas = [layer.alpha for layer in self.layers if layer.alpha is not None]
        if alphas:
            lines.append(f"alpha: mean {sum(alphas) / len(alphas):.3f}, min {min(alphas):.3f}, max {max(alphas):.3f}")
        timed = {name: value for name, value in self.stage_seconds.items() if value >= 0.05}
        if timed:
            lines.append("seconds per stage: " + ", ".join(f"{name} {value:.1f}" for name, value in timed.items()))
        if self.resumed_blocks:
            lines.append(f"resumed: {self.resumed_blocks} blocks restored from the resume folder")
        if self.offloaded_mb:
            lines.append(f"activation caches offloaded to disk: {self.offloaded_mb:.0f} MB written")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (config, seconds, peak_rss_mb, n_calib, layers as dicts)."""
        return {"config": self.config, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "n_calib": self.n_calib, "stage_seconds": dict(self.stage_seconds),
                "resumed_blocks": self.resumed_blocks, "offloaded_mb": self.offloaded_mb,
                "released_mb": self.released_mb, "average_bits": self.average_bits,
                "layer_bits": dict(self.layer_bits), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationReport":
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])]
        return cls(config=data["config"], layers=layers, seconds=data.get("seconds", 0.0),
                   peak_rss_mb=data.get("peak_rss_mb", 0.0), n_calib=data.get("n_calib", 0),
                   stage_seconds=dict(data.get("stage_seconds", {})), resumed_blocks=data.get("resumed_blocks", 0),
                   offloaded_mb=data.get("offloaded_mb", 0.0), released_mb=data.get("released_mb", 0.0),
                   average_bits=data.get("average_bits"), layer_bits=dict(data.get("layer_bits", {})))


def peak_rss_mb() -> float:
    """The process-lifetime peak resident set size, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
