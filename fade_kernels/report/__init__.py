"""Pictures of quantization runs: per-layer diagnostics and multi-seed WER (matplotlib, Agg)."""
from fade_kernels.report.plots import (
    has_field,
    plot_alpha_per_layer,
    plot_error_vs_depth,
    plot_rho_per_layer,
    plot_wer_per_method_seed,
    write_report_plots,
)

__all__ = ["has_field", "plot_alpha_per_layer", "plot_error_vs_depth", "plot_rho_per_layer",
           "plot_wer_per_method_seed", "write_report_plots"]
