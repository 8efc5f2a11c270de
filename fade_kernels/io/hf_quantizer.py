"""transformers integration: `from_pretrained` of checkpoints written by `save_quantized`.

A checkpoint directory (see fade_kernels.io.checkpoint) carries in config.json

  "quantization_config": {"quant_method": "fade", "checkpoint_format": "fade", "format_version": 1,
                          "bits", "group_size", "sym", "desc_act", "method",
                          "modules": {full module name: {"bits", "group_size", "sym"}}, ...}

transformers does not know quant_method "fade" by itself: it warns, skips quantization and
returns a model whose quantized layers are RANDOMLY initialised nn.Linear. This module teaches it
the method. Importing it registers `FadeQuantConfig` and `FadeHfQuantizer` under "fade"
(`register_with_transformers()` does the same and is safe to call any number of times):

  import fade_kernels.io.hf_quantizer  # noqa: F401  -- before from_pretrained, once per process
  from transformers import AutoModelForSpeechSeq2Seq

  model = AutoModelForSpeechSeq2Seq.from_pretrained("whisper-tiny-w3g32")   # QuantLinear layers

What from_pretrained then does: it builds the model on the meta device, `FadeHfQuantizer`
swaps every nn.Linear named in `modules` for a meta `QuantLinear(in, out, bits, group_size,
bias=..., sym=...)`, checks the safetensors headers (every qweight/qzeros/scales/g_idx/bias is
present with the expected shape and dtype, so a damaged checkpoint raises instead of leaving
uninitialised buffers), and transformers loads the tensors into those buffers. The buffers keep
their stored dtypes (qweight/qzeros/g_idx int32, scales float16, bias float32) whatever `dtype`
from_pretrained was given; `dtype` only applies to the full-precision weights (embeddings, norms,
convs, the tied proj_out, which stays tied to the decoder embedding).

The weights are already quantized: the quantizer never quantizes on load
(`param_needs_quantization` is False, and passing a FadeQuantConfig to from_pretrained of a
full-precision checkpoint raises: run the fade-kernels pipeline instead). The model is not
trainable. Saving goes through `save_quantized` (which calls save_pretrained and re-writes the
quantization_config); a plain `save_pretrained` writes the same layout.

`load_quantized` remains the strict loader with no dependence on transformers' loading path;
both return the same model (tested bit-for-bit on the logits).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from fade_kernels.io.checkpoint import (
    CONFIG_NAME,
    FADE_CHECKPOINT_FORMAT,
    FADE_QUANT_METHOD,
    FORMAT_VERSION,
    CheckpointError,
    check_fade_config,
    quantized_modules,
    swap_in_meta_quant_linear,
)
from fade_kernels.nn.quant_linear import QuantLinear

__all__ = ["FadeHfQuantizer", "FadeQuantConfig", "is_registered", "register_with_transformers"]

# Stored dtype of every QuantLinear tensor (fade_kernels.io.checkpoint's layout).
_BUFFER_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16,
                  "g_idx": torch.int32, "bias": torch.float32}
# safetensors header dtype names of the above.
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.float32: "F32"}


class FadeQuantConfig(QuantizationConfigMixin):
    """config.json `quantization_config` of a fade checkpoint, as transformers wants it.

    Every key of the stored dict becomes an attribute, so `to_dict()` gives back exactly what
    save_quantized wrote (extra keys such as damp or block_size included), and save_pretrained
    of a model loaded with from_pretrained writes the same quantization_config back. `modules` ({full module
    name: {"bits", "group_size", "sym"}}) is the only part the loader acts on; it is validated
    here with the same rules as load_quantized (ValueError naming the problem).
    """

    def __init__(self, modules: dict[str, dict[str, Any]], bits: int | None = None, group_size: int | None = None,
                 sym: bool | None = None, desc_act: bool = False, method: str = "unknown",
                 checkpoint_format: str = FADE_CHECKPOINT_FORMAT, format_version: int = FORMAT_VERSION,
                 quant_method: str = FADE_QUANT_METHOD, **kwargs: Any):
        self.quant_method = quant_method
        self.checkpoint_format = checkpoint_format
        self.format_version = format_version
        self.modules = modules
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.method = method
        for key, value in kwargs.items():
            if hasattr(type(self), key):  # e.g. "to_dict": would shadow a method of the config
                raise ValueError(f"quantization_config key {key!r} clashes with an attribute of {type(self).__name__}")
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate like load_quantized does (quant_method, checkpoint_format, version, modules)."""
        check_fade_config({"quantization_config": self.to_dict()}, Path(CONFIG_NAME))
        if self.bits is None or self.group_size is None or self.sym is None:
            # Hand-built configs may omit the summary values: take the most common module value.
            specs = list(self.modules.values())
            for key in ("bits", "group_size", "sym"):
                if getattr(self, key) is None:
                    values = [spec[key] for spec in specs]
                    setattr(self, key, max(set(values), key=values.count))

    def __repr__(self) -> str:  # the full JSON lists every module: to_json_string() has it
        return (f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
                f"method={self.method!r}, modules=<{len(self.modules)} layers>)")


class FadeHfQuantizer(HfQuantizer):
    """Loads pre-quantized fade checkpoints: swaps the listed nn.Linear for QuantLinear.

    Never quantizes: the packed buffers come from the checkpoint as they are.
    """

    requires_calibration = True  # a full-precision checkpoint cannot be quantized on load
    quantization_config: FadeQuantConfig

    def __init__(self, quantization_config: FadeQuantConfig, **kwargs: Any):
        if not kwargs.get("pre_quantized", True):
            raise ValueError("from_pretrained cannot quantize to the fade format: the checkpoint has no fade "
                             "quantization_config. Quantize with fade-kernels (quantize_model / the CLI), "
                             "save with save_quantized, then load that directory")
        super().__init__(quantization_config, **kwargs)
        self.modules_to_quantize: dict[str, str] = {}  # model module name -> checkpoint module name

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("fade checkpoints cannot be loaded with disk offloading (device_map contains 'disk')")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # weights are already quantized on disk

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        modules = self.quantization_config.modules
        tied = _tied_module_names(model)
        resolved: dict[str, str] = {}
        for saved_name, spec in modules.items():
            name = _resolve_module_name(model, saved_name)
            if name is None:
                raise CheckpointError(f"{CONFIG_NAME}: quantized module {saved_name!r} does not exist in "
                                      f"{type(model).__name__}")
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{CONFIG_NAME}: quantized module {saved_name!r} is a "
                                      f"{type(linear).__name__}, not nn.Linear")
            if name in tied:
                raise CheckpointError(f"{CONFIG_NAME}: quantized module {saved_name!r} shares its weight with "
                                      f"another module (tied); tied layers must stay full precision")
            swap_in_meta_quant_linear(model, name, linear, spec, CONFIG_NAME)
            resolved[name] = saved_name
        self.modules_to_quantize = resolved
        if checkpoint_files:
            from fade_kernels.io.integrity import verify_checksums

            # The digests recorded at save time (fade_checksums.json), as load_quantized checks them:
            # a damaged file is an IntegrityError naming it, never a silently different model.
            for folder in sorted({str(Path(file).parent) for file in checkpoint_files}):
                verify_checksums(folder)
            _check_checkpoint_headers(model, resolved, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, layer in quantized_modules(model).items():
            for buf, want in _BUFFER_DTYPES.items():
                tensor = getattr(layer, buf, None)
                if tensor is None:
                    continue
                if tensor.is_meta:
                    raise CheckpointError(f"{name}.{buf} was not loaded from the checkpoint")
                if tensor.dtype != want:
                    # Only reachable through a dtype plan that up-casts float buffers (keep_in_fp32):
                    # float16 -> float32 -> float16 is exact. Anything else is a loading bug.
                    if not (tensor.is_floating_point() and want == torch.float16 and tensor.dtype == torch.float32):
                        raise CheckpointError(f"{name}.{buf} was loaded as {tensor.dtype}, expected {want}")
                    layer._buffers[buf] = tensor.to(want)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        # save_quantized writes through save_pretrained: refusing here would make a model loaded
        # with from_pretrained impossible to save. The state dict is already the fade layout.
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


# ----------------------------------------------------------------------------------------------
# Helpers


def _resolve_module_name(model: nn.Module, name: str) -> str | None:
    """`name` as a module of `model`, allowing for the base-model prefix (e.g. "model.").

    A checkpoint saved from WhisperForConditionalGeneration names "model.encoder.layers.0.fc1";
    AutoModel builds WhisperModel, where that layer is "encoder.layers.0.fc1" (transformers
    renames the tensors the same way). The reverse also holds.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(f"{prefix}.")] if name.startswith(f"{prefix}.") else [f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _tied_module_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    keys = set(dict(tied or {}).keys()) | set(dict(tied or {}).values())
    return {key.rpartition(".")[0] for key in keys}


def _check_checkpoint_headers(model: nn.Module, resolved: dict[str, str], files: list[str]) -> None:
    """Every QuantLinear tensor is in the safetensors files with the layer's shape and dtype.

    transformers only warns about missing tensors and would leave those buffers uninitialised;
    reading the headers (no tensor data) lets a damaged checkpoint fail before anything loads.
    """
    from safetensors import safe_open

    headers: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            return  # not our format (e.g. pytorch_model.bin): leave the checks to transformers
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                headers[key] = (piece.get_dtype(), tuple(piece.get_shape()), str(file))
    for name, saved_name in resolved.items():
        layer = model.get_submodule(name)
        for buf, want in _BUFFER_DTYPES.items():
            tensor = getattr(layer, buf, None)
            if tensor is None:
                continue
            key = f"{saved_name}.{buf}"
            if key not in headers:
                alternative = f"{name}.{buf}"
                if alternative not in headers:
                    raise CheckpointError(f"{Path(files[0]).parent}: quantized tensor {key!r} is missing from "
                                          f"the checkpoint (config.json lists module {saved_name!r})")
                key = alternative
            dtype, shape, file = headers[key]
            if shape != tuple(tensor.shape):
                raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, the module built from "
                                      f"{CONFIG_NAME} expects {tuple(tensor.shape)}")
            if dtype != _SAFETENSORS_DTYPES[want]:
                raise CheckpointError(f"{file}: quantized tensor {key!r} has dtype {dtype}, "
                                      f"expected {_SAFETENSORS_DTYPES[want]}")


# ----------------------------------------------------------------------------------------------
# Registration

_REGISTER_LOCK = threading.Lock()


def _mappings() -> tuple[dict, dict]:
    from transformers.quantizers import auto

    return auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING


def _same_class(a: type, b: type) -> bool:
    # importlib.reload of this module makes new class objects with the same qualified name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def is_registered() -> bool:
    """True when transformers maps quant_method "fade" to this module's config and quantizer."""
    configs, quantizers = _mappings()
    return (FADE_QUANT_METHOD in configs and _same_class(configs[FADE_QUANT_METHOD], FadeQuantConfig)
            and FADE_QUANT_METHOD in quantizers and _same_class(quantizers[FADE_QUANT_METHOD], FadeHfQuantizer))


def register_with_transformers() -> None:
    """Register quant_method "fade" with transformers (idempotent, thread-safe, process-global).

    After this, AutoModel*.from_pretrained / <Model>.from_pretrained load fade checkpoints with
    QuantLinear layers. Importing fade_kernels.io.hf_quantizer already calls it; calling it again
    is a no-op. Raises RuntimeError when some other package registered a different "fade".
    """
    configs, quantizers = _mappings()
    with _REGISTER_LOCK:
        for mapping, cls, register in ((configs, FadeQuantConfig, register_quantization_config),
                                       (quantizers, FadeHfQuantizer, register_quantizer)):
            current = mapping.get(FADE_QUANT_METHOD)
            if current is None:
                register(FADE_QUANT_METHOD)(cls)
            elif current is not cls:
                if not _same_class(current, cls):
                    raise RuntimeError(f"transformers already maps quant_method {FADE_QUANT_METHOD!r} to "
                                       f"{current.__module__}.{current.__qualname__}; refusing to replace it")
                mapping[FADE_QUANT_METHOD] = cls  # this module was reloaded: point at the new class


register_with_transformers()
