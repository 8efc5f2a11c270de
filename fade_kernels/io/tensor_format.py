"""How a quantized checkpoint stores the tensors that are not QuantLinear buffers.

- The tied output projection / token embedding is stored in the model's head format
  (nn/head.py: fp32, bf16, bits8, bits4), once; quantization_config["head"] names the format and
  the loader rebuilds the embedding module that reads the projection's rows.
- The remaining float32 tensors (convolution stems, positional tables, LayerNorms, biases of
  layers that are not quantized) are stored as float16 when that is lossless (every value is a
  float16 value), and the loader casts them back: the loaded model is bit-identical to the saved
  one. Models distributed in float16 (the CTranslate2 Whisper models, many hub checkpoints)
  qualify entirely; float32-trained ones keep float32. Tensors of modules the model keeps in
  float32 (_keep_in_fp32_modules), the head/embedding and QuantLinear's own buffers are written as
  they are.
"""
from __future__ import annotations

import torch
from torch import nn

from fade_kernels.nn.head import finish_head_after_loading, prepare_head_for_loading
from fade_kernels.nn.quant_linear import QuantLinear

def _kept_as_is(model: nn.Module) -> set[str]:
    """state_dict names stored in their own dtype: QuantLinear buffers, the head and embedding,
    modules in _keep_in_fp32_modules."""
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    special = {id(model.get_output_embeddings()), id(model.get_input_embeddings())} \
        if hasattr(model, "get_output_embeddings") else set()
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = isinstance(module, QuantLinear) or id(module) in special or \
            any(f".{p}." in f".{prefix}" for p in keep_fp32)
        if own:
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
            names.update(prefix + n for n, _ in module.named_buffers(recurse=False))
    return names


def storage_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() as it is written to disk: float32 tensors outside `_kept_as_is` as
    float16 when the conversion is exact; tensors that share storage stay shared (saved once)."""
    kept = _kept_as_is(model)
    out: dict[str, torch.Tensor] = {}
    converted: dict[tuple, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in kept or tensor.dtype != torch.float32 or tensor.numel() == 0:
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in converted:
            half = tensor.to(torch.float16)
            converted[key] = half if torch.equal(half.float(), tensor) else tensor
        out[name] = converted[key]
    return out


def prepare_model_for_loading(model: nn.Module, quantization_config: dict) -> None:
    """Before the checkpoint's tensors are assigned to the meta model: the head's module layout."""
    prepare_head_for_loading(model, quantization_config.get("head"))


def finish_loaded_model(model: nn.Module) -> None:
    """After the tensors were assigned (and cast to the model's dtype): the head's own dtype."""
    finish_head_after_loading(model)
