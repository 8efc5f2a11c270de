"""Quantized checkpoints: a transformers model whose linear layers are QuantLinear, on disk.

Directory layout (written by `save_quantized`, read by `load_quantized`):

  config.json                  the model's transformers config plus `quantization_config` (below)
  model.safetensors            every persistent tensor of model.state_dict(), names unchanged; a
                               tied tensor (Whisper/Moonshine `proj_out.weight` = decoder
                               `embed_tokens.weight`) is stored once, under its source name.
                               Large models may be sharded: model-0000k-of-0000n.safetensors +
                               model.safetensors.index.json (transformers' layout).
  generation_config.json       the model's generation config
  preprocessor_config.json ... the processor's files, when a processor was given
  fade_checksums.json          sha256 of every file above (and of each tensor's bytes), written
                               last; load_quantized verifies it (io/integrity.py)

Per QuantLinear `<name>` the file holds (K = in_features, N = out_features, G = K / group):
  <name>.qweight  int32   [K*bits/32, N]            codes packed along K (packing.py)
  <name>.qzeros   int32   [G, ceil(N/32)*bits]      TRUE zero points z ("v2"), N padded to 32
  <name>.scales   float16 [G, N]
  <name>.g_idx    int32   [K]                       group of each input column
  <name>.bias     float32 [N]                       only when the layer has a bias

`quantization_config` schema (format_version 1):

  {"quant_method": "fade", "checkpoint_format": "fade", "format_version": 1,
   "bits": int, "group_size": int, "sym": bool, "desc_act": bool, "method": str,
   "modules": {"model.encoder.layers.0.fc1": {"bits": 3, "group_size": 32, "sym": false}, ...},
   ...any extra keys the caller passed (QuantConfig.to_dict(): damp, block_size, ...)}

`modules` lists every QuantLinear and is the only part the loader trusts: a layer's group_size is
-1 when one group spans the whole row. The top-level bits/group_size/sym/desc_act/method describe
the run for people and other tools (the caller's values when given, else the most common
per-module value).

Usage:

  save_quantized(model, "whisper-tiny-w3g32", processor=processor, quant_config=QuantConfig(...))
  model = load_quantized("whisper-tiny-w3g32")          # eval mode, proj_out tied again
  processor = load_processor("whisper-tiny-w3g32")
  asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                 feature_extractor=processor.feature_extractor)

AutoModel*.from_pretrained also opens these directories once `fade_kernels.io` is imported
(it registers quant_method "fade" with transformers; see hf_quantizer.py). Without that import
transformers does not know "fade", warns, and returns randomly initialised nn.Linear layers.

Loading builds the model from config.json with every nn.Parameter on the meta device (nothing
allocated or randomly initialised; buffers such as rotary `inv_freq` are computed for real),
swaps the listed modules for QuantLinear, checks names, shapes and dtypes against the files, then
assigns the tensors read from disk and re-ties the output projection.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fade_kernels.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from fade_kernels.nn.quant_linear import QuantLinear

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FADE_QUANT_METHOD = "fade"
FADE_CHECKPOINT_FORMAT = "fade"
FORMAT_VERSION = 1
# Keys save_quantized computes itself; a caller's quant_config may not override them.
_RESERVED_KEYS = ("quant_method", "checkpoint_format", "format_version", "modules")
_QUANT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, corrupt, or does not describe a model we can build."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file or directory the checkpoint needs does not exist (also a FileNotFoundError)."""


# ----------------------------------------------------------------------------------------------
# Describing the quantized layers


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of `model`, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def module_spec(layer: QuantLinear) -> dict[str, Any]:
    """{"bits", "group_size", "sym"} of one layer; group_size -1 when one group spans the row.

    -1 rather than the resolved width because QuantLinear only accepts the configured sizes
    (32/64/128/-1): a whole-row group on K = 384 must be rebuilt as -1, not 384.
    """
    group = -1 if layer.group_size == layer.in_features else layer.group_size
    return {"bits": int(layer.bits), "group_size": int(group), "sym": bool(layer.sym)}


def _is_act_order(layer: QuantLinear) -> bool:
    # GPTQ act-order with static groups keeps g_idx = k // g; a permuted g_idx is "desc_act".
    trivial = torch.arange(layer.in_features, device=layer.g_idx.device) // layer.group_size
    return not torch.equal(layer.g_idx.long(), trivial)


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def build_quantization_config(model: nn.Module, quant_config: dict | Any | None = None) -> dict[str, Any]:
    """The `quantization_config` dict save_quantized writes (schema in the module docstring).

    quant_config: dict (or an object with to_dict(), e.g. QuantConfig) merged in; its
    bits/group_size/sym/method become the top-level values; `act_order` also sets desc_act.
    A config already on model.config (a loaded checkpoint being re-saved) is the base, so
    extra keys such as "method" survive a load/save cycle.
    """
    layers = quantized_modules(model)
    if not layers:
        raise ValueError("model has no QuantLinear layers: nothing quantized to save "
                         "(use model.save_pretrained for a full-precision model)")
    if quant_config is not None and not isinstance(quant_config, dict):
        if not hasattr(quant_config, "to_dict"):
            raise TypeError(f"quant_config must be a dict or have to_dict(), got {type(quant_config).__name__}")
        quant_config = quant_config.to_dict()
    extra = dict(quant_config or {})
    bad = [k for k in _RESERVED_KEYS if k in extra]
    if bad:
        raise ValueError(f"quant_config may not set {bad}: save_quantized computes them from the model")

    modules = {name: module_spec(layer) for name, layer in layers.items()}
    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(previous, "to_dict"):   # a FadeQuantConfig when loaded through from_pretrained
        previous = previous.to_dict()
    out: dict[str, Any] = {}
    if isinstance(previous, dict) and previous.get("quant_method") == FADE_QUANT_METHOD:
        out.update({k: v for k, v in previous.items() if k not in _RESERVED_KEYS})
    out.update({
        "bits": _most_common([s["bits"] for s in modules.values()]),
        "group_size": _most_common([s["group_size"] for s in modules.values()]),
        "sym": _most_common([s["sym"] for s in modules.values()]),
        "desc_act": any(_is_act_order(layer) for layer in layers.values()),
    })
    out.setdefault("method", "unknown")
    if "act_order" in extra and "desc_act" not in extra:
        extra["desc_act"] = bool(extra["act_order"])
    out.update(extra)
    out.update({"quant_method": FADE_QUANT_METHOD, "checkpoint_format": FADE_CHECKPOINT_FORMAT,
                "format_version": FORMAT_VERSION, "modules": modules})
    if hasattr(model, "get_output_embeddings"):
        from fade_kernels.nn.head import head_format

        out["head"] = head_format(model)         # how the tied output projection/embedding is stored
    return out


# ----------------------------------------------------------------------------------------------
# Atomic directory writes


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename publishes them: a crash after the rename must not
    # leave a complete-looking directory of empty or partial files.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    Write everything into the yielded path. If the body raises (or the process dies), the
    temporary directory is discarded (or left as `.<name>.tmp-<pid>-*`) and `out_dir` is untouched.
    On success an existing `out_dir` is renamed aside, the new one renamed in, then the old one
    deleted, so at every instant either the old or the new complete checkpoint exists on disk
    (if the process dies between the two renames, the old one is at `.<name>.old-<pid>-*`).
    Only an empty folder or a checkpoint of ours is ever replaced (io/output_dir.py): a folder
    holding anything else, a file, or the current folder raise OutputDirError before anything is
    written. A successful save deletes the temporaries that killed saves left beside `out_dir`.
    """
    from fade_kernels.io.output_dir import check_output_dir, remove_stale_temporaries, temporary_prefix

    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir, "tmp"), dir=out_dir.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if out_dir.exists():
            check_output_dir(out_dir, overwrite=True)   # nothing foreign appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir, "old"), dir=out_dir.parent)) / "old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                shutil.rmtree(old.parent, ignore_errors=True)
                raise
            shutil.rmtree(old.parent, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temporaries(out_dir)


# ----------------------------------------------------------------------------------------------
# Saving


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_model_files(model: nn.Module, directory: Path, quantization_config: dict,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained into `directory`, then put `quantization_config` into its config.json.

    transformers' save_pretrained handles our int32/fp16 buffers, deduplicates the tied
    proj_out/embed_tokens storage and shards large models. save_original_format=False keeps
    the file's tensor names equal to model.state_dict() names, which the loader relies on.
    config.json is patched afterwards rather than setting model.config.quantization_config, so
    saving never mutates the caller's model.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    from fade_kernels.io.tensor_format import storage_state_dict

    if state_dict is None:
        state_dict = storage_state_dict(model)   # compact storage of the non-quantized tensors
    model.save_pretrained(directory, state_dict=state_dict, save_original_format=False)
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config
    _write_json(config_path, config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (directory / GENERATION_CONFIG_NAME).exists():
        generation_config.save_pretrained(directory)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, processor: Any = None,
                   quant_config: dict | Any | None = None, format: str = FADE_CHECKPOINT_FORMAT) -> Path:
    """Write `model` (a transformers model with QuantLinear layers) to `out_dir` atomically.

    model: e.g. WhisperForConditionalGeneration after some nn.Linear were swapped for
        QuantLinear. processor: optional processor/tokenizer/feature extractor (anything with
        save_pretrained) saved beside the weights. quant_config: dict or QuantConfig recorded in
        config.json's quantization_config (see the module docstring for the schema).
    format: "fade" (this module's layout) or a format other tools load, "compressed-tensors" or
        "gptq" (see fade_kernels.io.export, which refuses what the target cannot load).
    An existing out_dir is replaced only once the new checkpoint is completely written, and only
    when it is empty or a checkpoint of ours (OutputDirError otherwise: a user's files are never
    deleted). fade_checksums.json records every file's sha256 (io/integrity.py); loads verify it.
    Returns the checkpoint directory.
    """
    if format != FADE_CHECKPOINT_FORMAT:
        from fade_kernels.io.export import export_checkpoint

        return export_checkpoint(model, out_dir, format, processor=processor, quant_config=quant_config)
    from fade_kernels.io.integrity import write_checksums

    quantization_config = build_quantization_config(model, quant_config)
    with atomic_directory(out_dir) as tmp:
        write_model_files(model, tmp, quantization_config)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_checksums(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Reading files


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of checkpoint directory `path` as a dict, with errors that name the file."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"{config_path} is missing: not a saved model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: file} from model.safetensors.index.json, or {"*": model.safetensors}."""
    root = Path(path)
    index_path = root / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc!r}") from exc
        return {name: root / fname for name, fname in weight_map.items()}
    single = root / WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointNotFoundError(f"{single} is missing (and there is no {WEIGHTS_INDEX_NAME})")
    return {"*": single}


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory on CPU, plus the file each one came from.

    Truncated or corrupt files raise CheckpointError naming the file (safetensors checks that
    the header and every tensor's byte range fit the file before handing out data).
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(set(weight_files(path).values()))
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointNotFoundError(f"{file} is missing (listed in {WEIGHTS_INDEX_NAME})")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} appears in both {origin[name]} and {file}")
                    tensors[name] = reader.get_tensor(name)
                    origin[name] = file
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
        except OSError as exc:
            raise CheckpointError(f"{file} could not be read: {exc}") from exc
    return tensors, origin


def tensor_names(path: str | os.PathLike) -> list[str]:
    """Names of the tensors in a checkpoint directory, read from headers only."""
    from safetensors import SafetensorError, safe_open

    files = weight_files(path)
    if "*" not in files:
        return list(files)
    try:
        with safe_open(str(files["*"]), framework="pt", device="cpu") as reader:
            return list(reader.keys())
    except SafetensorError as exc:
        raise CheckpointError(f"{files['*']} is not a readable safetensors file "
                              f"(truncated or corrupt?): {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Building the empty model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while modules are constructed.

    Modules allocate a parameter (torch.empty, never touched) which is moved to meta as soon as
    it is registered, so random initialisation runs on meta tensors and costs nothing. Buffers are
    left alone: non-persistent ones (rotary inv_freq, position ids) are computed in __init__ and
    are not in the checkpoint, so they must be real. A global torch.device("meta") would make
    them meta too. Not thread-safe (patches nn.Module.register_parameter for the duration).
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def model_config_from_dict(config_dict: dict[str, Any], source: Path):
    """A transformers PretrainedConfig from a config.json dict (without quantization_config)."""
    from transformers import AutoConfig

    config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{source} has no model_type: cannot tell which transformers model to build")
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: cannot build a transformers config for "
                              f"model_type={model_type!r}: {exc}") from exc


def model_class_for(config, source: Path) -> type:
    """The transformers model class named by config.architectures[0]."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise CheckpointError(f"{source} has no 'architectures' entry: cannot tell which model class to build")
    cls = getattr(transformers, architectures[0], None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{source}: architecture {architectures[0]!r} is not a transformers model class")
    return cls


def build_empty_model(config_dict: dict[str, Any], source: Path, modules: dict[str, dict[str, Any]]) -> nn.Module:
    """The model of config.json with meta parameters and meta QuantLinear layers in `modules`.

    modules: {name: {"bits", "group_size", "sym"}}; each name must be an nn.Linear of the model.
    """
    config = model_config_from_dict(config_dict, source)
    cls = model_class_for(config, source)
    with _parameters_on_meta():
        model = cls(config)
    for name, spec in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"{source}: quantized module {name!r} does not exist in {cls.__name__}") from exc
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{source}: quantized module {name!r} is a {type(linear).__name__}, not nn.Linear")
        swap_in_meta_quant_linear(model, name, linear, spec, source)
    return model


def swap_in_meta_quant_linear(model: nn.Module, name: str, linear: nn.Linear, spec: dict, source: str) -> None:
    """Replace model.<name> (the nn.Linear `linear`) by an empty QuantLinear built from `spec`
    ({"bits", "group_size", "sym"}) on the meta device; the checkpoint's tensors fill it later.
    A spec QuantLinear refuses becomes a CheckpointError naming `source` and the module."""
    try:
        with torch.device("meta"):
            layer = QuantLinear(linear.in_features, linear.out_features, spec["bits"], spec["group_size"],
                                bias=linear.bias is not None, sym=spec["sym"])
    except ValueError as exc:
        raise CheckpointError(f"{source}: cannot build quantized module {name!r}: {exc}") from exc
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def validate_modules(modules: Any, source: Path) -> dict[str, dict[str, Any]]:
    """Check the quantization_config `modules` map: {name: {"bits", "group_size", "sym"}}."""
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{source}: quantization_config.modules must be a non-empty object "
                              f"{{module name: {{bits, group_size, sym}}}}, got {modules!r}")
    for name, spec in modules.items():
        if not isinstance(spec, dict):
            raise CheckpointError(f"{source}: quantization_config.modules[{name!r}] must be an object, got {spec!r}")
        if spec.get("bits") not in SUPPORTED_BITS:
            raise CheckpointError(f"{source}: module {name!r} has bits={spec.get('bits')!r}; "
                                  f"supported {SUPPORTED_BITS}")
        if spec.get("group_size") not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(f"{source}: module {name!r} has group_size={spec.get('group_size')!r}; "
                                  f"supported {SUPPORTED_GROUP_SIZES}")
        if not isinstance(spec.get("sym"), bool):
            raise CheckpointError(f"{source}: module {name!r} has sym={spec.get('sym')!r}; expected true or false")
    return modules


# ----------------------------------------------------------------------------------------------
# Loading


def _tied_keys(model: nn.Module) -> dict[str, str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return dict(tied or {})


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _fp32_module_prefixes(model: nn.Module) -> list[str]:
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path], source: Path,
              dtype: torch.dtype) -> None:
    """Strictly assign `tensors` to the meta-initialised `model`, then re-tie and check.

    Missing or unexpected names, wrong shapes and wrong dtypes of quantized buffers raise
    CheckpointError naming the tensor and its file. Floating-point tensors outside QuantLinear
    are cast to `dtype` (modules in the model's _keep_in_fp32_modules stay float32).
    """
    tensors = dict(tensors)
    tied = _tied_keys(model)
    for target, src in tied.items():
        # The tied copy was deduplicated on save; give both names the one tensor, re-tie below.
        if target not in tensors and src in tensors:
            tensors[target] = tensors[src]
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors in the checkpoint "
                              f"(config.json does not describe these weights): {_listing(unexpected)}")

    quant_names = {f"{name}.{buf}" for name, layer in quantized_modules(model).items()
                   for buf in (*_QUANT_BUFFERS, "bias") if getattr(layer, buf, None) is not None}
    keep_fp32 = _fp32_module_prefixes(model)
    prepared: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        got = tensors[name]
        where = origin.get(name, source)
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(got.shape)}, the model built from "
                                  f"{source / CONFIG_NAME} expects {tuple(want.shape)}")
        if name in quant_names:
            if got.dtype != want.dtype:
                raise CheckpointError(f"{where}: quantized tensor {name!r} has dtype {got.dtype}, "
                                      f"expected {want.dtype}")
        elif got.is_floating_point():
            if not want.is_floating_point():
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {got.dtype}, expected {want.dtype}")
            fp32 = any(f".{p}." in f".{name}" for p in keep_fp32)
            got = got.to(torch.float32 if fp32 else dtype)
        elif got.dtype != want.dtype:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {got.dtype}, expected {want.dtype}")
        prepared[name] = got
    # assign=True puts the loaded tensors in place of the meta ones (no second copy).
    model.load_state_dict(prepared, strict=True, assign=True)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: tensors left uninitialised after loading: {_listing(still_meta)}")
    for name, layer in quantized_modules(model).items():
        n_groups = layer.scales.shape[0]
        if layer.g_idx.numel() and (int(layer.g_idx.min()) < 0 or int(layer.g_idx.max()) >= n_groups):
            raise CheckpointError(f"{origin.get(name + '.g_idx', source)}: {name}.g_idx has values outside "
                                  f"[0, {n_groups - 1}] (the layer has {n_groups} groups)")


def finish_model(model: nn.Module, path: Path, quantization_config: dict, dtype: torch.dtype,
                 device: str | torch.device) -> nn.Module:
    """Generation config, quantization_config on model.config, device, eval mode."""
    if (path / GENERATION_CONFIG_NAME).is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path / GENERATION_CONFIG_NAME} could not be read: {exc}") from exc
    model.config.quantization_config = quantization_config
    model.config.dtype = dtype
    return model.to(device).eval()


def check_fade_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The validated fade quantization_config of a config.json dict."""
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{source} has no quantization_config: not a quantized checkpoint "
                              f"(load full-precision models with from_pretrained)")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    fmt = qc.get("checkpoint_format")
    if method == "gptq" or fmt in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{source} is a GPTQ checkpoint (quant_method={method!r}, checkpoint_format={fmt!r}); "
                              f"read it with load_quantized or fade_kernels.io.import_gptq")
    if method != FADE_QUANT_METHOD:
        raise CheckpointError(f"{source}: quantization_config.quant_method is {method!r}, "
                              f"expected {FADE_QUANT_METHOD!r}")
    if fmt != FADE_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: quantization_config.checkpoint_format is {fmt!r}; accepted: "
                              f"{FADE_CHECKPOINT_FORMAT!r} (GPTQ 'gptq'/'gptq_v2' checkpoints: use import_gptq)")
    version = qc.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version!r} is newer than this fade-kernels reads "
                              f"({FORMAT_VERSION}); upgrade fade-kernels")
    validate_modules(qc.get("modules"), source)
    return qc


def load_model(path: str | os.PathLike, modules: dict[str, dict[str, Any]], config: dict[str, Any],
               quantization_config: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
               transform: Callable[[nn.Module, dict, dict], None] | None = None, verify: bool = True) -> nn.Module:
    """Shared by load_quantized and import_gptq: build, read, optionally transform, assign.

    verify: check the files against the directory's fade_checksums.json first, when it has one
    (IntegrityError naming the damaged file and tensor).
    transform(model, tensors, origin) may rewrite `tensors` in place before they are checked
    and assigned (import_gptq converts GPTQ zero points into our layout there).
    """
    root = Path(path)
    source = root / CONFIG_NAME
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if verify:
        from fade_kernels.io.integrity import verify_checksums

        verify_checksums(root)
    from fade_kernels.io.tensor_format import finish_loaded_model, prepare_model_for_loading

    model = build_empty_model(config, source, modules)
    try:
        prepare_model_for_loading(model, quantization_config)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    tensors, origin = read_tensors(root)
    if transform is not None:
        transform(model, tensors, origin)
    load_into(model, tensors, origin, root, dtype)
    finish_loaded_model(model)
    return finish_model(model, root, quantization_config, dtype, device)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Read a checkpoint written by save_quantized; returns the transformers model in eval mode.

    Also reads checkpoints made elsewhere, into the same QuantLinear layers (packed, never
    densified): compressed-tensors pack-quantized (llm-compressor's W4A16/W8A16; see
    compressed_tensors.py) and GPTQ (import_gptq), told apart by quantization_config.quant_method.
    dtype: floating dtype of the non-quantized weights (embeddings, norms, convs, proj_out);
        QuantLinear buffers keep their stored dtypes (int32 / float16 scales / float32 bias).
    Raises CheckpointError (a ValueError; CheckpointNotFoundError is also a FileNotFoundError)
    naming the file and the problem when the checkpoint is missing, truncated or inconsistent.
    verify: compare every file with the sha256 recorded at save time (fade_checksums.json) first;
        a mismatch raises IntegrityError (a CheckpointError) naming the file and the tensor.
    """
    from fade_kernels.io.integrity import CHECKSUMS_NAME, verify_checksums

    root = Path(path)
    verified = verify and root.is_dir() and verify_checksums(root)
    config = read_config(root)
    stored = config.get("quantization_config")
    method = stored.get("quant_method") if isinstance(stored, dict) else None
    if method == "compressed-tensors":
        from fade_kernels.io.compressed_tensors import import_compressed_tensors

        return import_compressed_tensors(root, dtype, device)
    if method == "gptq":
        from fade_kernels.io.gptq_format import import_gptq

        return import_gptq(root, dtype, device)
    qc = check_fade_config(config, root / CONFIG_NAME)
    if verify and not verified:
        warnings.warn(f"{root} has no {CHECKSUMS_NAME} (saved by an older fade-kernels): its files cannot be "
                      f"verified; save it again to add one", stacklevel=2)
    return load_model(root, qc["modules"], config, qc, dtype, device, verify=False)


def load_processor(path: str | os.PathLike):
    """The processor saved beside a checkpoint (AutoProcessor, local files only)."""
    from transformers import AutoProcessor

    root = Path(path)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist")
    if not (root / "preprocessor_config.json").is_file() and not (root / "processor_config.json").is_file():
        raise CheckpointNotFoundError(f"{root} has no preprocessor_config.json: the checkpoint was saved "
                                      f"without a processor (pass processor= to save_quantized)")
    try:
        return AutoProcessor.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{root}: the processor files could not be loaded: {exc}") from exc
