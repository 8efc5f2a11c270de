"""Quantized checkpoints: our safetensors format (save/load) and GPTQ v1/v2 export/import."""
from fade_kernels.io.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    atomic_directory,
    build_quantization_config,
    load_processor,
    load_quantized,
    quantized_modules,
    save_quantized,
)
from fade_kernels.io.gptq_format import GPTQ_CHECKPOINT_FORMATS, export_gptq, import_gptq

__all__ = [
    "GPTQ_CHECKPOINT_FORMATS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "atomic_directory",
    "build_quantization_config",
    "export_gptq",
    "import_gptq",
    "load_processor",
    "load_quantized",
    "quantized_modules",
    "save_quantized",
]
