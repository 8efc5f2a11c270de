"""compressed-tensors `pack-quantized` checkpoints (llm-compressor, vLLM, transformers): export and import.

This is the layout llm-compressor writes for W4A16 / W8A16 models and the one vLLM serves
(`CompressedTensorsWNA16`). Per quantized linear `<name>` (weight W of shape [N, K], b bits,
G = K / group_size groups; group_size -1 is compressed-tensors' "channel" strategy, G = 1):

  <name>.weight_packed      int32 [N, ceil(K*b/32)]  row n is one little-endian bit stream: element
                                                     k at stream bits [k*b, k*b + b); 32 elements
                                                     fill exactly b words, so 3-bit fields straddle
                                                     words (compressed-tensors >= 0.18; see below)
  <name>.weight_scale       float [N, G]
  <name>.weight_zero_point  int32 [ceil(N*b/32), G]  asymmetric only: the same bit stream, running
                                                     down the output dimension of each column
  <name>.weight_shape       int64 [2]                (N, K)
  <name>.weight_g_idx       int32 [K]                only with group act-order (written by
                                                     compressed-tensors <= 0.17; read, never written)

Every stored field is the signed value plus 2^(b-1): compressed-tensors quantizes to
q in [-2^(b-1), 2^(b-1) - 1] with a signed zero point zp and dequantizes (q - zp) * scale. With
our unsigned codes c = q + 2^(b-1) and zero points z = zp + 2^(b-1), (q - zp) = (c - z), so
the stored fields ARE our codes and zero points, and a symmetric layer (zp = 0) is our z = 2^(b-1).
Our packing.py uses the same bit stream along K, so `weight_packed` is exactly our `qweight`
transposed, and `weight_zero_point` is our `qzeros` transposed with its zero-filled tail words
(N padded to 32) cut to ceil(N*b/32).

Scales are written as float32 holding our float16 values exactly: compressed-tensors dequantizes
in the scale's dtype, so float32 scales make its decompressed weight equal ours bit for bit
(float16 would round the product). vLLM casts them to the serving dtype when it loads them.

3-bit: compressed-tensors <= 0.17 packed 32 // b = 10 fields per word (2 bits unused); 0.18
switched to the dense stream above. Export writes the dense layout; import reads both, telling
them apart by the packed width (ceil(3K/32) words vs ceil(K/10)). vLLM's kernels do not take
3 bits (its CPU kernel refuses uint3), so export warns.

config.json `quantization_config` (what llm-compressor writes, with the keys both
compressed-tensors 0.17 and 0.20 accept):

  {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
   "version": ..., "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4,
   "type": "int", "symmetric": false, "strategy": "group", "group_size": 128, "dynamic": false},
   "input_activations": null, "output_activations": null, "format": null}},
   "ignore": ["proj_out"], "kv_cache_scheme": null, "global_compression_ratio": null,
   "sparsity_config": {}, "transform_config": {}}

Export writes one group targeting the class "Linear", with `ignore` listing the nn.Linear
layers left in full precision (Whisper's tied proj_out); a model whose layers use different
grids is refused (transformers decompresses every layer with the first group). Import also
reads several groups targeting modules by exact name or "re:" pattern.

Import turns each layer into a QuantLinear holding the same codes (the packed words are
transposed, never expanded to floats) and converts the scales to float16, warning with the
largest relative change when they are not float16 values (llm-compressor writes scales in the
model's dtype, float32 for Whisper).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fade_kernels.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from fade_kernels.io.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    load_model,
    quantized_modules,
    read_config,
    tensor_names,
    validate_modules,
    write_model_files,
)
from fade_kernels.io.export import ExportRefused
from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.packing import codes_per_run, pack_codes, pack_qzeros, unpack_codes, unpack_qweight, unpack_qzeros

CT_QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
# The layout version written (the dense 3-bit stream appeared in compressed-tensors 0.18).
CT_LAYOUT_VERSION = "0.20.1"
# Widths vLLM's WNA16 kernels serve; others are written with a warning.
VLLM_WNA16_BITS = (4, 8)
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


# ----------------------------------------------------------------------------------------------
# The compressed-tensors bit stream along one dimension


def pack_stream(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 rule on unsigned fields.

    values: integer (R, C) in [0, 2^bits - 1]. Packs along `dim`: the run is zero-padded to a
    multiple of 32 fields, packed as one little-endian stream, then cut to ceil(C*bits/32)
    words. Returns int32 with that many words along `dim`.
    """
    moved = values.movedim(dim, 1).to(torch.int64)
    length = moved.shape[1]
    padded = -(-length // 32) * 32
    if padded != length:
        moved = torch.nn.functional.pad(moved, (0, padded - length))
    words = pack_codes(moved, bits, dim=1)[:, : math.ceil(length * bits / 32)]
    return words.movedim(1, dim).contiguous()


def unpack_stream(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Inverse of pack_stream: int32 words -> int32 fields, `count` of them along `dim`.

    Raises ValueError when the words cannot hold `count` fields.
    """
    run, run_words = codes_per_run(bits)
    moved = words.movedim(dim, 1)
    width = moved.shape[1]
    if width != math.ceil(count * bits / 32):
        raise ValueError(f"{width} words along dim {dim}; {count} {bits}-bit fields take {math.ceil(count * bits / 32)}")
    whole = -(-width // run_words) * run_words
    if whole != width:
        moved = torch.nn.functional.pad(moved, (0, whole - width))
    return unpack_codes(moved, bits, dim=1)[:, :count].movedim(1, dim).contiguous()


def unpack_legacy_stream(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """compressed-tensors <= 0.17 for widths that do not divide 32: 32 // bits fields per word,
    field i of a word at bits [i*bits, i*bits + bits), the top 32 % bits bits unused."""
    per_word = 32 // bits
    moved = words.movedim(dim, 1).to(torch.int64) & 0xFFFFFFFF
    if moved.shape[1] != -(-count // per_word):
        raise ValueError(f"{moved.shape[1]} words along dim {dim}; {count} fields at {per_word} per word "
                         f"take {-(-count // per_word)}")
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    fields = (moved.unsqueeze(-1) >> shifts) & (2 ** bits - 1)            # (R, W, per_word)
    fields = fields.reshape(moved.shape[0], -1)[:, :count]
    return fields.to(torch.int32).movedim(1, dim).contiguous()


def _fields(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Fields of either 3-bit layout (told apart by width); the dense stream for other widths."""
    width = words.shape[dim]
    if 32 % bits and width != math.ceil(count * bits / 32) and width == -(-count // (32 // bits)):
        return unpack_legacy_stream(words, bits, count, dim)
    return unpack_stream(words, bits, count, dim)


# ----------------------------------------------------------------------------------------------
# One layer


def layer_to_compressed(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """A QuantLinear's tensors in the pack-quantized layout (suffix -> tensor; module docstring).

    Raises ExportRefused for a permuted g_idx (group act-order: pack-quantized has no g_idx)
    or a symmetric layer whose zero points are not 2^(bits-1).
    """
    bits, n, k = layer.bits, layer.out_features, layer.in_features
    trivial = torch.arange(k, device=layer.g_idx.device) // layer.group_size
    if not torch.equal(layer.g_idx.long(), trivial):
        raise ExportRefused("a layer uses GPTQ act-order with a permuted g_idx; compressed-tensors pack-quantized "
                            "has no g_idx since 0.18 (quantize with --act-order off, or export --format gptq)")
    zeros = unpack_qzeros(layer.qzeros, bits, n)                                  # (N, G)
    out = {
        "weight_packed": pack_stream(unpack_qweight(layer.qweight, bits), bits, dim=1),
        "weight_scale": layer.scales.t().float().contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if layer.sym:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise ExportRefused(f"a symmetric layer has zero points other than 2^(bits-1) = {2 ** (bits - 1)}; "
                                "compressed-tensors stores no zero point for symmetric layers")
    else:
        out["weight_zero_point"] = pack_stream(zeros, bits, dim=0)
    return out


def layer_from_compressed(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                          name: str) -> dict[str, torch.Tensor]:
    """pack-quantized tensors of one layer -> our buffers {qweight, qzeros, scales, g_idx}.

    tensors: suffix -> tensor as stored (weight_packed, weight_scale, weight_shape, and
    weight_zero_point when asymmetric, weight_g_idx when present). Raises ValueError naming
    the tensor when a shape or dtype does not fit. Scales come back as float16.
    """
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        if suffix not in tensors:
            raise ValueError(f"tensor '{name}.{suffix}' is missing")
    shape = tensors["weight_shape"]
    if shape.numel() != 2:
        raise ValueError(f"'{name}.weight_shape' must hold 2 values (N, K), got {shape.tolist()}")
    n, k = (int(v) for v in shape.tolist())
    packed = tensors["weight_packed"]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != n:
        raise ValueError(f"'{name}.weight_packed' must be int32 [{n}, words], got {packed.dtype} {tuple(packed.shape)}")
    codes = _fields(packed, bits, k, dim=1)                                       # (N, K)
    groups = 1 if group_size == -1 else k // group_size
    scale = tensors["weight_scale"]
    if not scale.is_floating_point() or tuple(scale.shape) != (n, groups):
        raise ValueError(f"'{name}.weight_scale' must be a float [{n}, {groups}] tensor, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if sym:
        zeros = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        stored = tensors.get("weight_zero_point")
        if stored is None:
            raise ValueError(f"tensor '{name}.weight_zero_point' is missing (the layer is asymmetric)")
        if stored.dtype == torch.int32:
            if stored.dim() != 2 or stored.shape[1] != groups:
                raise ValueError(f"'{name}.weight_zero_point' must be int32 [words, {groups}], "
                                 f"got {tuple(stored.shape)}")
            zeros = _fields(stored, bits, n, dim=0)                               # (N, G)
        elif stored.dtype == torch.int8 and tuple(stored.shape) == (n, groups):
            zeros = stored.to(torch.int32) + 2 ** (bits - 1)                      # unpacked signed (older writers)
        else:
            raise ValueError(f"'{name}.weight_zero_point' has dtype {stored.dtype} and shape {tuple(stored.shape)}; "
                             f"expected packed int32 [{math.ceil(n * bits / 32)}, {groups}]")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    elif tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise ValueError(f"'{name}.weight_g_idx' must be an integer [{k}] tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    return {"qweight": pack_codes(codes, bits, dim=1).t().contiguous(), "qzeros": pack_qzeros(zeros, bits),
            "scales": scale.t().to(torch.float16).contiguous(), "g_idx": g_idx.to(torch.int32)}


# ----------------------------------------------------------------------------------------------
# Export


def weights_args(layer: QuantLinear, channel: bool) -> dict[str, Any]:
    """compressed-tensors `weights` args of one layer: strategy "channel" (one scale per row)
    when `channel`, else "group" with the layer's group size."""
    return {"num_bits": int(layer.bits), "type": "int", "symmetric": bool(layer.sym),
            "strategy": "channel" if channel else "group", "group_size": None if channel else int(layer.group_size),
            "dynamic": False}


def ct_quantization_config(model: nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    """config.json `quantization_config` for a pack-quantized export whose layers all use the
    `weights` args (schema in the module docstring); every other nn.Linear is in `ignore`."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": None}
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return {"quant_method": CT_QUANT_METHOD, "format": CT_FORMAT, "quantization_status": "compressed",
            "version": CT_LAYOUT_VERSION, "config_groups": {"group_0": group}, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """model.state_dict() with every QuantLinear's buffers replaced by its pack-quantized tensors,
    plus the weights args all layers share. Raises ExportRefused naming the layer and the reason.

    One grid for all layers: transformers' compressed-tensors loader decompresses every layer
    with the first config group, so a checkpoint with several would load wrong there.
    """
    layers = quantized_modules(model)
    if not layers:
        raise ExportRefused("model has no QuantLinear layers: nothing quantized to export")
    # Whole-row groups everywhere (group_size -1) is the "channel" strategy; otherwise a group
    # that happens to span a narrow layer's row stays "group" with the configured size.
    channel = all(layer.group_size == layer.in_features for layer in layers.values())
    first_name, first = next(iter(layers.items()))
    shared = weights_args(first, channel)
    state_dict = model.state_dict()
    for name, layer in layers.items():
        args = weights_args(layer, channel)
        if args != shared:
            differ = ", ".join(f"{k} {args[k]} vs {shared[k]}" for k in args if args[k] != shared[k])
            raise ExportRefused(f"{name} and {first_name} use different grids ({differ}): transformers' "
                                f"compressed-tensors loader applies one config group to every layer")
        try:
            compressed = layer_to_compressed(layer)
        except ExportRefused as exc:
            raise ExportRefused(f"{name}: {exc}") from None
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            state_dict.pop(f"{name}.{buf}")
        state_dict.update({f"{name}.{suffix}": tensor for suffix, tensor in compressed.items()})
    return state_dict, shared


def write_compressed_tensors(model: nn.Module, directory: Path) -> list[str]:
    """Write the pack-quantized checkpoint of `model` into the (empty) `directory`.

    Returns warnings for what the file holds but vLLM will not serve (bits outside 4/8).
    """
    state_dict, weights = compressed_state_dict(model)
    notes = []
    if weights["num_bits"] not in VLLM_WNA16_BITS:
        notes.append(f"{weights['num_bits']}-bit layers are written in compressed-tensors' current layout, but "
                     f"vLLM's WNA16 kernels only take {' and '.join(map(str, VLLM_WNA16_BITS))} bits: vLLM will "
                     f"refuse this checkpoint (transformers with compressed-tensors >= 0.18 reads it)")
    write_model_files(model, directory, ct_quantization_config(model, weights), state_dict=state_dict)
    return notes


# ----------------------------------------------------------------------------------------------
# Import


def is_compressed_tensors(quantization_config: Any) -> bool:
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == CT_QUANT_METHOD


def _target_matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _scheme_for(name: str, groups: dict[str, Any], ignore: list[str], source: Path) -> dict[str, Any]:
    """The weights args of the config group that quantizes module `name` (a Linear).

    Name targets (exact or "re:") win over class targets ("Linear"), as in compressed-tensors.
    """
    if any(_target_matches(pattern, name) for pattern in ignore):
        raise CheckpointError(f"{source}: module {name!r} has packed tensors but quantization_config.ignore lists it")
    by_name = [g for g in groups.values() if any(_target_matches(t, name) for t in g.get("targets") or [])]
    by_class = [g for g in groups.values() if "Linear" in (g.get("targets") or [])]
    chosen = (by_name or by_class or [None])[0]
    if chosen is None:
        raise CheckpointError(f"{source}: no quantization_config.config_groups entry targets module {name!r}")
    return chosen


def _module_spec(name: str, group: dict[str, Any], source: Path) -> dict[str, Any]:
    """{bits, group_size, sym} from one config group; CheckpointError for what we cannot run."""
    weights = group.get("weights")
    where = f"{source}: module {name!r}"
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: its config group has no weight quantization")
    for kind in ("input_activations", "output_activations"):
        if group.get(kind):
            raise CheckpointError(f"{where} quantizes {kind} ({group[kind].get('num_bits')}-bit); only weight-only "
                                  f"schemes (W4A16, W8A16) run on fade-kernels")
    if weights.get("type", "int") != "int":
        raise CheckpointError(f"{where} has {weights.get('type')!r} weights; only integer weights are supported")
    if weights.get("dynamic"):
        raise CheckpointError(f"{where} has dynamic weight quantization; only static weights are supported")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{where} has num_bits={bits!r}; supported {SUPPORTED_BITS}")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group":
        group_size = weights.get("group_size")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(f"{where} has group_size={group_size!r}; supported {SUPPORTED_GROUP_SIZES}")
    else:
        raise CheckpointError(f"{where} has strategy={strategy!r}; supported 'group' and 'channel'")
    return {"bits": bits, "group_size": group_size, "sym": bool(weights.get("symmetric", True))}


def _check_ct_config(qc: dict[str, Any], source: Path) -> dict[str, Any]:
    fmt = qc.get("format")
    formats = {fmt} | {g.get("format") for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)}
    formats.discard(None)
    if formats != {CT_FORMAT}:
        raise CheckpointError(f"{source}: compressed-tensors format {sorted(formats) or None} is not supported; "
                              f"fade-kernels reads {CT_FORMAT!r} (W4A16/W8A16 as llm-compressor writes them)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"{source}: quantization_status is {status!r}; only 'compressed' checkpoints hold "
                              f"packed weights")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: quantization_config.config_groups must be a non-empty object")
    return groups


def import_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu") -> nn.Module:
    """Read a pack-quantized compressed-tensors checkpoint into QuantLinear layers (packed).

    Layers are the modules with a `.weight_packed` tensor; their grid comes from the config
    group that targets them. Returns the transformers model in eval mode with a fade
    quantization_config on model.config (so save_quantized writes it in our format). Raises
    CheckpointError naming the file and the reason for anything it cannot run as stored.
    """
    root = Path(path)
    config = read_config(root)
    source = root / CONFIG_NAME
    qc = config.get("quantization_config")
    if not is_compressed_tensors(qc):
        raise CheckpointError(f"{source}: quant_method is not {CT_QUANT_METHOD!r}")
    groups = _check_ct_config(qc, source)
    ignore = list(qc.get("ignore") or [])
    names = [key[: -len(".weight_packed")] for key in tensor_names(root) if key.endswith(".weight_packed")]
    if not names:
        raise CheckpointError(f"{root}: no '*.weight_packed' tensors found: nothing quantized to import")
    specs = validate_modules({name: _module_spec(name, _scheme_for(name, groups, ignore, source), source)
                              for name in names}, source)
    rounded: list[float] = []

    def convert(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
        for name, layer in quantized_modules(model).items():
            stored = {s: tensors.pop(f"{name}.{s}") for s in _PACKED_SUFFIXES if f"{name}.{s}" in tensors}
            spec = specs[name]
            where = origin.get(f"{name}.weight_packed", root)
            try:
                buffers = layer_from_compressed(stored, spec["bits"], spec["group_size"], spec["sym"], name)
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from exc
            if (layer.out_features, layer.in_features) != tuple(stored["weight_shape"].tolist()):
                raise CheckpointError(f"{where}: '{name}.weight_shape' is {stored['weight_shape'].tolist()}, the "
                                      f"model built from {CONFIG_NAME} has [{layer.out_features}, {layer.in_features}]")
            scale = stored["weight_scale"].double()
            rounded.append(float(((buffers["scales"].t().double() - scale).abs() / scale.abs().clamp(min=1e-30)).max()))
            tensors.update({f"{name}.{buf}": value for buf, value in buffers.items()})
            bias = tensors.get(f"{name}.bias")
            if bias is not None and bias.is_floating_point():
                tensors[f"{name}.bias"] = bias.float()

    fade_config = {
        "quant_method": "fade", "checkpoint_format": "fade", "format_version": 1, "modules": specs,
        "method": "unknown", "imported_from": {"quant_method": CT_QUANT_METHOD, "format": CT_FORMAT,
                                               "version": qc.get("version")},
    }
    model = load_model(root, specs, config, fade_config, dtype, device, transform=convert)
    worst = max(rounded, default=0.0)
    if worst > 0:
        warnings.warn(f"{root}: weight scales are not float16 values; rounded to float16 for fade-kernels "
                      f"(largest relative change {worst:.2e})", stacklevel=2)
    return model


__all__ = [
    "CT_FORMAT",
    "CT_QUANT_METHOD",
    "import_compressed_tensors",
    "is_compressed_tensors",
    "layer_from_compressed",
    "layer_to_compressed",
    "pack_stream",
    "unpack_stream",
    "write_compressed_tensors",
]
