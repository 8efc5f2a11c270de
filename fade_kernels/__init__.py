"""fade-kernels: 3/4-bit post-training quantization and packed kernels for encoder-decoder ASR.

Public entry points are imported lazily so `import fade_kernels` stays cheap (no transformers).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "fade_kernels.config",
    "QuantLinear": "fade_kernels.nn.quant_linear",
    "gptq_quantize": "fade_kernels.solver.gptq",
    "rtn_quantize": "fade_kernels.solver.rtn",
    "pack_qweight": "fade_kernels.packing",
    "unpack_qweight": "fade_kernels.packing",
    "quantize_model": "fade_kernels.api",
    "prepare_samples": "fade_kernels.calib.samples",
    "save_quantized": "fade_kernels.io.checkpoint",
    "load_quantized": "fade_kernels.io.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fade_kernels' has no attribute {name!r}")
