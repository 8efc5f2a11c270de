"""Pure solver functions on tensors: grids, RTN, Hessians, GPTQ. No modules, no hooks."""
from fade_kernels.solver.grid import Grid, compute_grid, dequantize_codes, quantize_to_codes
from fade_kernels.solver.rtn import rtn_quantize
from fade_kernels.solver.gptq import GPTQResult, gptq_quantize

__all__ = [
    "Grid", "compute_grid", "quantize_to_codes", "dequantize_codes",
    "rtn_quantize", "gptq_quantize", "GPTQResult",
]
