"""The quantized matmul front door and its backends."""
from fade_kernels.ops.registry import BACKENDS, Backend, backend_table, quant_linear_forward, register_backend, select_backend

# Optional backends register themselves on import; a missing native library only marks the
# backend unavailable (with the reason `fade info` prints), it never fails this import.
from fade_kernels.ops import cpu as _cpu  # noqa: F401,E402
from fade_kernels.ops import cuda as _cuda  # noqa: F401,E402 (never raises: no _C_cuda or GPU -> unavailable)
from fade_kernels.ops import triton_qmatmul as _triton  # noqa: F401,E402 (never raises: no triton or CUDA -> unavailable)

__all__ = ["BACKENDS", "Backend", "backend_table", "quant_linear_forward", "register_backend", "select_backend"]
