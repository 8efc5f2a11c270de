"""Quantized checkpoints: our safetensors format (save/load), GPTQ v1/v2 and compressed-tensors
pack-quantized export/import (export_checkpoint writes what vLLM and transformers load)."""
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
from fade_kernels.io.compressed_tensors import import_compressed_tensors
from fade_kernels.io.export import EXPORT_FORMATS, ExportRefused, export_checkpoint
from fade_kernels.io.gptq_format import GPTQ_CHECKPOINT_FORMATS, export_gptq, import_gptq
# Registers quant_method "fade" with transformers, so from_pretrained loads our checkpoints
# into QuantLinear layers instead of silently building random nn.Linear ones.
from fade_kernels.io import hf_quantizer as _hf_quantizer  # noqa: F401

__all__ = [
    "EXPORT_FORMATS",
    "GPTQ_CHECKPOINT_FORMATS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ExportRefused",
    "atomic_directory",
    "build_quantization_config",
    "export_checkpoint",
    "export_gptq",
    "import_compressed_tensors",
    "import_gptq",
    "load_processor",
    "load_quantized",
    "quantized_modules",
    "save_quantized",
]
