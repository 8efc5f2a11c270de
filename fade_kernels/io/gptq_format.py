"""GPTQ-format checkpoints (AutoGPTQ / GPTQModel / optimum / vLLM layout): export and import.

Per quantized linear `<name>` (K = in_features, N = out_features, G = K / group_size):
  <name>.qweight  int32   [K*bits/32, N]        codes packed along K, same words as ours
  <name>.qzeros   int32   [G, ceil(N/32)*bits]  zero points packed along N, see below
  <name>.scales   float16 [G, N]
  <name>.g_idx    int32   [K]                   group of each input column (permuted = desc_act)
  <name>.bias     float32 [N]                   when the layer has one (kept float32: lossless;
                                                GPTQ loaders cast it to their own bias dtype)
Every other tensor (embeddings, norms, convs, proj_out) is stored as in save_quantized, and the
tied proj_out/embed_tokens storage is written once.

Zero-point conventions, named by quantization_config.checkpoint_format (transformers' GPTQConfig
also reads the same value from "format"; we write both):
  "gptq"    (v1, AutoGPTQ): each b-bit field holds (z - 1) mod 2^b, i.e. the subtraction wraps
            inside the field (z = 0 is stored as 2^b - 1) and never borrows from the neighbour
            field. Readers add 1 back per field, masked to b bits, as GPTQModel does for every
            width (its 3-bit path decodes fields for exactly this reason: 3-bit fields straddle
            words). Caveat: older AutoGPTQ kernels add 1 without the mask and decode a stored
            2^b - 1 as 2^b instead of 0, so a layer with a true zero point of 0 (an asymmetric
            group whose minimum is > -scale/2) is only read correctly by masking readers;
            export warns when that happens. "gptq_v2" has no such hazard.
  "gptq_v2" (v2, GPTQModel): each field holds z, exactly our QuantLinear buffer.
A checkpoint without checkpoint_format, or with any other value, is refused: reading v2 zeros as
v1 (or the reverse) shifts every weight by one step of its grid, silently.

qzeros width: AutoGPTQ/GPTQModel allocate N // 32 * bits words per row, which equals ours,
ceil(N/32) * bits, whenever N is a multiple of 32 (every Whisper/Moonshine width). For other N
their allocation cannot hold N zero points at all; we export our zero-padded layout
(ceil(N/32)*bits words, pad fields 0, the layout QuantLinear uses) and warn that those loaders
will reject the shape. Import accepts any width that holds at least N fields in whole packing
runs (ours, or the tight ceil(N*bits/32) some tools write for 2/4/8 bits) and repacks it into
ours.
"""
from __future__ import annotations

import json
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
    atomic_directory,
    build_quantization_config,
    load_model,
    load_quantized,
    quantized_modules,
    read_config,
    tensor_names,
    validate_modules,
    write_model_files,
)
from fade_kernels.packing import codes_per_run, pack_qzeros, unpack_codes, unpack_qzeros

# checkpoint_format value -> zero-point convention, and back.
GPTQ_CHECKPOINT_FORMATS = {"gptq": "v1", "gptq_v2": "v2"}
ZERO_POINT_FORMATS = {"v1": "gptq", "v2": "gptq_v2"}
QUANTIZE_CONFIG_NAME = "quantize_config.json"  # AutoGPTQ's sidecar; GPTQModel reads it too


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fade-kernels")
    except PackageNotFoundError:  # a bare source checkout has no metadata; the tag is informational
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Zero points


def zeros_to_gptq(qzeros: torch.Tensor, bits: int, out_features: int, zero_point_format: str) -> torch.Tensor:
    """Our qzeros (true z, int32 [G, ceil(N/32)*bits]) -> the GPTQ tensor of that format.

    v2: a copy. v1: every field (z - 1) mod 2^bits, same shape; pad fields stay 0.
    """
    if zero_point_format == "v2":
        return qzeros.clone()
    zeros = unpack_qzeros(qzeros, bits, out_features)                    # (N, G) int32
    return pack_qzeros((zeros - 1) & (2 ** bits - 1), bits)             # wrap inside the field


def zeros_from_gptq(stored: torch.Tensor, bits: int, out_features: int, zero_point_format: str) -> torch.Tensor:
    """GPTQ qzeros int32 [G, W] (v1 or v2) -> our qzeros int32 [G, ceil(N/32)*bits] of true z.

    W must hold at least N fields in whole packing runs (a multiple of 3 words for 3-bit);
    raises ValueError otherwise. v1 fields get 1 added back mod 2^bits.
    """
    run, words = codes_per_run(bits)
    if stored.dim() != 2 or stored.dtype != torch.int32:
        raise ValueError(f"qzeros must be a 2-D int32 tensor, got {stored.dtype} {tuple(stored.shape)}")
    width = stored.shape[1]
    if width % words != 0 or width // words * run < out_features:
        least = -(-out_features // run) * words
        runs = f" in whole {words}-word runs" if words > 1 else ""
        raise ValueError(f"qzeros has {width} words per row; {bits}-bit zero points of N={out_features} outputs "
                         f"need at least {least} words{runs} (export_gptq writes {(out_features + 31) // 32 * bits})")
    fields = unpack_codes(stored, bits, dim=1)[:, :out_features]         # (G, N) int32
    if zero_point_format == "v1":
        fields = (fields + 1) & (2 ** bits - 1)
    return pack_qzeros(fields.t(), bits)


# ----------------------------------------------------------------------------------------------
# Export


def _dynamic_rules(model: nn.Module, specs: dict[str, dict], default: dict) -> dict[str, dict]:
    """GPTQModel/vLLM `dynamic`: "+:regex" per-module overrides, "-:regex" = leave unquantized.

    Exact-name patterns (re.match against the module name, anchored with $).
    """
    rules: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rules[f"-:^{re.escape(name)}$"] = {}
    for name, spec in specs.items():
        if any(spec[k] != default[k] for k in ("bits", "group_size", "sym")):
            rules[f"+:^{re.escape(name)}$"] = dict(spec)
    return rules


def gptq_quantization_config(model: nn.Module, zero_point_format: str,
                             quant_config: dict | Any | None = None) -> dict[str, Any]:
    """config.json `quantization_config` for a GPTQ export of `model`.

    {"quant_method": "gptq", "bits", "group_size", "sym", "desc_act", "checkpoint_format": "gptq" |
     "gptq_v2", "format": same, "pack_dtype": "int32", "lm_head": false, "true_sequential": true,
     "static_groups": false, "dynamic": {...}, "meta": {"quantizer": ["fade-kernels:<v>"],
     "fade_modules": {name: {bits, group_size, sym}}, "fade_method", "damp_percent"?}}
    """
    fade = build_quantization_config(model, quant_config)
    modules = fade["modules"]
    default = {"bits": fade["bits"], "group_size": fade["group_size"], "sym": fade["sym"]}
    fmt = ZERO_POINT_FORMATS[zero_point_format]
    meta: dict[str, Any] = {"quantizer": [f"fade-kernels:{_version()}"], "fade_modules": modules,
                            "fade_method": fade.get("method", "unknown")}
    if "damp" in fade:
        meta["damp_percent"] = fade["damp"]
    return {
        "quant_method": "gptq", **default, "desc_act": bool(fade["desc_act"]),
        "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32", "lm_head": False,
        "true_sequential": True, "static_groups": False,
        "dynamic": _dynamic_rules(model, modules, default), "meta": meta,
    }


def _block_relative(name: str) -> str:
    """"model.encoder.layers.3.self_attn.q_proj" -> "self_attn.q_proj" (the name inside its block)."""
    match = re.search(r"\.layers\.\d+\.(.+)$", name)
    return match.group(1) if match else name


def check_vllm_gptq(model: nn.Module) -> None:
    """Raise ExportRefused (one line) when vLLM's GPTQ loader cannot load `model`'s layers.

    vLLM maps GPTQ layers to (bits, sym) in {(4, True), (8, True)} and refuses every other
    pair; its `dynamic` overrides match its own fused names (qkv_proj), so one grid must serve
    every layer.
    """
    from fade_kernels.io.export import ExportRefused

    layers = quantized_modules(model)
    if not layers:
        raise ExportRefused("model has no QuantLinear layers: nothing quantized to export")
    for name, layer in layers.items():
        if not layer.sym:
            raise ExportRefused(f"{name} is asymmetric: vLLM loads only symmetric GPTQ checkpoints; export "
                                f"--format compressed-tensors (vLLM serves asymmetric W4A16 from it) or quantize with --sym")
        if layer.bits not in (4, 8):
            raise ExportRefused(f"{name} is {layer.bits}-bit: vLLM's GPTQ loader takes only 4- and 8-bit layers")
    grids = {(layer.bits, layer.group_size, layer.sym) for layer in layers.values()}
    if len(grids) > 1:
        raise ExportRefused(f"layers use {len(grids)} different grids (bits, group size): vLLM's GPTQ loader "
                            f"needs one grid for every layer")
    # modules_in_block_to_quantize is one list for every block: a layer quantized in some blocks
    # must be quantized in every block that has it.
    listed = {_block_relative(name) for name in layers}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"\.layers\.\d+\.", name) and _block_relative(name) in listed:
            raise ExportRefused(f"{name} is in full precision but {_block_relative(name)} is quantized in other "
                                f"blocks: vLLM's GPTQ module list is one list for every block; export "
                                f"--format compressed-tensors (it lists layers by full name)")


def write_gptq(model: nn.Module, directory: Path, zero_point_format: str = "v1",
               quant_config: dict | Any | None = None, for_vllm: bool = False) -> list[str]:
    """Write the GPTQ checkpoint of `model` into the (empty) `directory`; returns warnings.

    for_vllm: also write `modules_in_block_to_quantize` and zero `<k_proj>.bias` tensors for
    bias-free quantized k_proj layers (vLLM fuses them into a biased qkv_proj); the caller
    checks check_vllm_gptq first.
    """
    qconfig = gptq_quantization_config(model, zero_point_format, quant_config)
    layers = quantized_modules(model)

    state_dict = model.state_dict()
    ragged, zero_z = [], []
    for name, layer in layers.items():
        state_dict[f"{name}.qzeros"] = zeros_to_gptq(layer.qzeros, layer.bits, layer.out_features, zero_point_format)
        if layer.out_features % 32:
            ragged.append(name)
        if zero_point_format == "v1" and bool((unpack_qzeros(layer.qzeros, layer.bits, layer.out_features) == 0).any()):
            zero_z.append(name)
    if for_vllm:
        qconfig["modules_in_block_to_quantize"] = [sorted({_block_relative(name) for name in layers})]
        for name, layer in layers.items():
            if name.endswith(".k_proj") and layer.bias is None:
                state_dict[f"{name}.bias"] = torch.zeros(layer.out_features, dtype=torch.float32)
    notes = []
    if ragged:
        notes.append(f"{len(ragged)} layers have N not a multiple of 32 ({ragged[0]}, ...): their qzeros are written "
                     f"zero-padded to ceil(N/32)*bits words; AutoGPTQ/GPTQModel allocate N//32*bits and will "
                     f"refuse them (fade_kernels.io.import_gptq reads them)")
    if zero_z:
        notes.append(f"{len(zero_z)} layers have zero points equal to 0 ({zero_z[0]}, ...): GPTQ v1 stores them "
                     f"as 2^bits - 1, which readers that add 1 without masking (AutoGPTQ kernels) decode as 2^bits; "
                     f"zero_point_format='v2' avoids this")
    write_model_files(model, directory, qconfig, state_dict=state_dict)
    with open(directory / QUANTIZE_CONFIG_NAME, "w", encoding="utf-8") as fh:
        json.dump(qconfig, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return notes


def export_gptq(model_or_dir: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                zero_point_format: str = "v1", quant_config: dict | Any | None = None) -> Path:
    """Write a GPTQ-format checkpoint of a QuantLinear model (or of a save_quantized directory).

    zero_point_format: "v1" (checkpoint_format "gptq", AutoGPTQ's z - 1, the most widely read)
        or "v2" (checkpoint_format "gptq_v2", z as stored). quant_config: extra run settings,
        as for save_quantized. Written atomically (see atomic_directory); also writes
        quantize_config.json for AutoGPTQ-era loaders. Returns out_dir. For a checkpoint vLLM
        loads, use fade_kernels.io.export.export_checkpoint(..., format="gptq").
    """
    if zero_point_format not in ZERO_POINT_FORMATS:
        raise ValueError(f"zero_point_format must be one of {sorted(ZERO_POINT_FORMATS)}, got {zero_point_format!r}")
    model = model_or_dir if isinstance(model_or_dir, nn.Module) else load_quantized(model_or_dir)
    with atomic_directory(out_dir) as tmp:
        notes = write_gptq(model, tmp, zero_point_format, quant_config)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Import


def _gptq_config(root: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(config.json dict, GPTQ quantization config, file it came from)."""
    config = read_config(root)
    source = root / CONFIG_NAME
    qc = config.get("quantization_config")
    if qc is None and (root / QUANTIZE_CONFIG_NAME).is_file():
        source = root / QUANTIZE_CONFIG_NAME
        try:
            qc = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{source} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(qc, dict):
        raise CheckpointError(f"{root / CONFIG_NAME} has no quantization_config (and no {QUANTIZE_CONFIG_NAME}): "
                              f"not a GPTQ checkpoint")
    method = qc.get("quant_method", "gptq" if source.name == QUANTIZE_CONFIG_NAME else None)
    if method == "fade":
        raise CheckpointError(f"{source} is a fade checkpoint (quant_method='fade'); read it with load_quantized")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method is {method!r}, expected 'gptq'")
    return config, qc, source


def _zero_point_format(qc: dict[str, Any], source: Path) -> str:
    """'v1' or 'v2' from checkpoint_format (or transformers' alias "format"); never guessed."""
    accepted = ", ".join(f"{k!r} ({v})" for k, v in GPTQ_CHECKPOINT_FORMATS.items())
    values = {k: qc[k] for k in ("checkpoint_format", "format") if qc.get(k) is not None}
    if not values:
        raise CheckpointError(f"{source}: quantization_config has no checkpoint_format, so the zero-point convention "
                              f"is unknown (v1 stores z-1, v2 stores z; guessing wrong corrupts every weight). "
                              f"Accepted values: {accepted}. Add the right one to the config if you know it.")
    normalized = {k: str(v).lower() for k, v in values.items()}
    if len(set(normalized.values())) > 1:
        raise CheckpointError(f"{source}: checkpoint_format={values.get('checkpoint_format')!r} and "
                              f"format={values.get('format')!r} disagree; accepted values: {accepted}")
    fmt = next(iter(normalized.values()))
    if fmt not in GPTQ_CHECKPOINT_FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format {fmt!r} is not supported; accepted values: {accepted}")
    return GPTQ_CHECKPOINT_FORMATS[fmt]


def _module_specs(names: list[str], qc: dict[str, Any], source: Path) -> dict[str, dict[str, Any]]:
    """{name: {bits, group_size, sym}} for each layer that has a .qweight in the files.

    Precedence: our meta.fade_modules entry, then the first matching positive `dynamic` rule,
    then the top-level values (GPTQModel's resolution order).
    """
    fade_modules = (qc.get("meta") or {}).get("fade_modules") or {}
    dynamic = qc.get("dynamic") or {}
    specs: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = {"bits": qc.get("bits"), "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True)}
        if name in fade_modules:
            spec.update({k: fade_modules[name][k] for k in spec if k in fade_modules[name]})
        else:
            for pattern, override in dynamic.items():
                if pattern.startswith("-:"):
                    if re.match(pattern[2:], name):
                        raise CheckpointError(f"{source}: module {name!r} has quantized tensors but `dynamic` "
                                              f"rule {pattern!r} marks it unquantized")
                    continue
                if re.match(pattern.removeprefix("+:"), name):
                    spec.update({k: override[k] for k in spec if k in (override or {})})
                    break
        if spec["bits"] not in SUPPORTED_BITS or spec["group_size"] not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(f"{source}: module {name!r} resolves to bits={spec['bits']!r}, "
                                  f"group_size={spec['group_size']!r}; supported bits {SUPPORTED_BITS}, "
                                  f"group sizes {SUPPORTED_GROUP_SIZES}")
        specs[name] = spec
    return validate_modules(specs, source)


def import_gptq(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> nn.Module:
    """Read a GPTQ checkpoint (checkpoint_format "gptq" = v1 or "gptq_v2") into QuantLinear layers.

    Layers are found from the `.qweight` tensors; bits/group/sym come from quantization_config
    (meta.fade_modules, dynamic, then top level) and must agree with the tensor shapes. v1 zero
    points get 1 added back per field (mod 2^bits), so export_gptq -> import_gptq is bit-exact in
    both formats. Returns the transformers model in eval mode, with model.config's
    quantization_config set to the equivalent fade config (so save_quantized round-trips).
    """
    root = Path(path)
    config, qc, source = _gptq_config(root)
    zero_point_format = _zero_point_format(qc, source)
    names = [key[: -len(".qweight")] for key in tensor_names(root) if key.endswith(".qweight")]
    if not names:
        raise CheckpointError(f"{root}: no '*.qweight' tensors found: nothing quantized to import")
    specs = _module_specs(names, qc, source)

    def convert_zeros(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
        for name, layer in quantized_modules(model).items():
            qweight, key = tensors.get(f"{name}.qweight"), f"{name}.qzeros"
            if qweight is not None and qweight.shape != layer.qweight.shape:
                # Checked before the zeros so a bits/group mismatch is reported as such.
                raise CheckpointError(
                    f"{origin.get(name + '.qweight', root)}: tensor '{name}.qweight' has shape {tuple(qweight.shape)}, "
                    f"but {source.name} gives the layer bits={layer.bits}, group_size={specs[name]['group_size']}, "
                    f"which expects {tuple(layer.qweight.shape)}")
            if key not in tensors:
                continue  # reported as a missing tensor by the strict load
            try:
                tensors[key] = zeros_from_gptq(tensors[key], layer.bits, layer.out_features, zero_point_format)
            except ValueError as exc:
                raise CheckpointError(f"{origin.get(key, root)}: {key}: {exc}") from exc
            bias = tensors.get(f"{name}.bias")
            if bias is not None and layer.bias is None and bias.is_floating_point() and not bool(bias.any()):
                del tensors[f"{name}.bias"]  # the zero k_proj bias vLLM needs (write_gptq(for_vllm=True))
            elif bias is not None and bias.is_floating_point() and bias.dtype != torch.float32:
                tensors[f"{name}.bias"] = bias.float()  # GPTQ tools store fp16 bias; QuantLinear keeps fp32

    fade_config = {
        "quant_method": "fade", "checkpoint_format": "fade", "format_version": 1, "modules": specs,
        "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
        "desc_act": qc.get("desc_act", False),
        "method": (qc.get("meta") or {}).get("fade_method", "gptq"),
        "imported_from": {"checkpoint_format": ZERO_POINT_FORMATS[zero_point_format]},
    }
    return load_model(root, specs, config, fade_config, dtype, device, transform=convert_zeros)


__all__ = [
    "GPTQ_CHECKPOINT_FORMATS",
    "export_gptq",
    "import_gptq",
    "zeros_from_gptq",
    "zeros_to_gptq",
]
