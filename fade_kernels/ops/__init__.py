"""The quantized matmul front door and its backends."""
from fade_kernels.ops.registry import BACKENDS, Backend, backend_table, quant_linear_forward, register_backend, select_backend

__all__ = ["BACKENDS", "Backend", "backend_table", "quant_linear_forward", "register_backend", "select_backend"]
