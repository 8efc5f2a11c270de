"""Pure solver functions on tensors: grids, RTN, Hessians, GPTQ, QEP, FADE, AWQ. No modules, no hooks."""
from fade_kernels.solver.grid import Grid, compute_grid, dequantize_codes, quantize_to_codes
from fade_kernels.solver.rtn import rtn_quantize
from fade_kernels.solver.gptq import GPTQResult, gptq_quantize
from fade_kernels.solver.qep import corrected_weight, qep_correction
from fade_kernels.solver.awq import AwqResult, awq_quantize, awq_search, fold_input_scale_into_layernorm

__all__ = [
    "Grid", "compute_grid", "quantize_to_codes", "dequantize_codes",
    "rtn_quantize", "gptq_quantize", "GPTQResult", "qep_correction", "corrected_weight",
    "AwqResult", "awq_quantize", "awq_search", "fold_input_scale_into_layernorm",
]
