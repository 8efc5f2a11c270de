"""Export a quantized model as a checkpoint other tools load: compressed-tensors or GPTQ for vLLM.

  export_checkpoint(model_or_dir, out_dir, format)        # or save_quantized(..., format=...)
  fade export QUANTIZED_DIR --format compressed-tensors --out DIR

Formats (EXPORT_FORMATS):
  "compressed-tensors"  pack-quantized W{b}A16 (compressed_tensors.py): what llm-compressor writes
                        and vLLM serves (4-bit on vLLM's CPU kernel; 4 and 8 on its GPU kernels),
                        symmetric or asymmetric, groups 32/64/128 or per channel. Other widths are
                        written with a warning (vLLM refuses them). Refused: act-order with a
                        permuted g_idx (the format has no g_idx), a fused group (q/k/v, cross
                        k/v) partly kept in full precision.
  "gptq"                GPTQ v1 (gptq_format.py) as vLLM loads it: the quantized module list
                        `modules_in_block_to_quantize` (without it vLLM guesses from tensor
                        dtypes under its own fused names and loads the layers wrong), and zero
                        `k_proj.bias` tensors (vLLM fuses Whisper's bias-free k_proj into a
                        biased qkv_proj and only fakes that bias for dense or pack-quantized
                        k_proj weights). Refused: what vLLM's GPTQ loader rejects, i.e.
                        asymmetric grids and widths other than 4 and 8, and mixed grids; a
                        fused group partly kept in full precision; blocks of one stack that
                        quantize different layers (the module list is one list for every block).

Everything outside the quantized linears is written as the model holds it, so layers a method
changed in full precision (AWQ's input scales folded into LayerNorms) are written as their
folded dense weights. A compact output projection (head format bf16/bits8/bits4, nn/head.py),
which neither target knows, is written as the float32 token embedding it is tied to, holding
the values the compact head multiplies by. The directory is written atomically (a temporary
folder renamed into place) with the processor files beside the weights and a `fade_export.json` naming the format.
An existing non-empty `out_dir` is replaced only when it holds that file (an earlier export);
anything else is refused, so a user's folder (or the quantized checkpoint itself) is never
overwritten.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fade_kernels.config import EXPORT_FORMATS
from fade_kernels.io.output_dir import EXPORT_MARKER

if TYPE_CHECKING:
    from torch import nn



class ExportRefused(ValueError):
    """The target format (or the engine it is written for) cannot load this model; the message
    is one line naming the layer and the reason."""


# Linears vLLM loads as one fused layer (its Whisper runs self-attention q/k/v as qkv_proj and the
# cross-attention k/v as kv_proj): one quantization scheme must cover every member.
FUSED_GROUPS = ((".self_attn.", ("q_proj", "k_proj", "v_proj")), (".encoder_attn.", ("k_proj", "v_proj")))


def check_fused_groups(model: "nn.Module") -> None:
    """Raise ExportRefused when a fused group (FUSED_GROUPS) is partly quantized (e.g. k_proj kept
    in full precision by --skip-modules while q_proj and v_proj are packed): vLLM cannot load one
    fused layer from a packed and a dense member."""
    from torch import nn

    from fade_kernels.nn.quant_linear import QuantLinear

    linears = {name: isinstance(m, QuantLinear) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, QuantLinear))}
    for marker, members in FUSED_GROUPS:
        prefixes = {name[: name.rindex(".")] for name in linears
                    if marker in name and name.rsplit(".", 1)[1] in members}
        for prefix in sorted(prefixes):
            packed = {m: linears.get(f"{prefix}.{m}") for m in members}
            if None not in packed.values() and len(set(packed.values())) > 1:
                dense = ", ".join(m for m, q in packed.items() if not q)
                raise ExportRefused(f"{prefix}: {dense} in full precision but {'/'.join(m for m, q in packed.items() if q)} "
                                    f"quantized; vLLM fuses {'/'.join(members)} into one layer, which needs one scheme "
                                    f"(skip all of them or none)")


def check_export_destination(out_dir: str | os.PathLike) -> None:
    """Refuse an `out_dir` that exists and is not empty, unless it is an earlier export (has
    EXPORT_MARKER). Raises ExportRefused."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportRefused(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ExportRefused(f"{out} is not empty and is not an export written by fade-kernels (no {EXPORT_MARKER}); "
                            f"choose a new or empty folder")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fade-kernels")
    except PackageNotFoundError:
        return "unknown"


def _source_processor(source: Path) -> Any:
    from fade_kernels.io.checkpoint import load_processor

    if (source / "preprocessor_config.json").is_file() or (source / "processor_config.json").is_file():
        return load_processor(source)
    return None


def export_checkpoint(model_or_dir: "nn.Module | str | os.PathLike", out_dir: str | os.PathLike, format: str,
                      processor: Any = None, quant_config: dict | Any | None = None) -> Path:
    """Write `model_or_dir` (a QuantLinear model, or a checkpoint directory load_quantized reads)
    to `out_dir` in `format` (one of EXPORT_FORMATS); returns out_dir.

    processor: saved beside the weights; taken from the source directory when a directory is
    given. quant_config: extra run settings recorded in a GPTQ export's meta. Raises
    ExportRefused (a ValueError) with a one-line reason when the format's target cannot load
    the model, before anything is written. Warns (warnings.warn) for what the checkpoint holds
    but some engine will not run, and when no processor files are written.
    """
    from torch import nn

    from fade_kernels.io.checkpoint import atomic_directory, load_quantized
    from fade_kernels.nn.head import dense_head

    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    check_export_destination(out_dir)
    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        model = load_quantized(model_or_dir)
        if processor is None:
            processor = _source_processor(Path(model_or_dir))
    with dense_head(model):
        check_fused_groups(model)                 # refusals before any folder is created
        if format == "compressed-tensors":
            from fade_kernels.io.compressed_tensors import compressed_state_dict, write_compressed_tensors

            compressed_state_dict(model)
            writer = lambda tmp: write_compressed_tensors(model, tmp)  # noqa: E731
        else:
            from fade_kernels.io.gptq_format import check_vllm_gptq, write_gptq

            check_vllm_gptq(model)
            writer = lambda tmp: write_gptq(model, tmp, "v1", quant_config, for_vllm=True)  # noqa: E731
        with atomic_directory(out_dir) as tmp:
            notes = writer(tmp)
            if processor is not None:
                processor.save_pretrained(tmp)
            with open(tmp / EXPORT_MARKER, "w", encoding="utf-8") as fh:
                json.dump({"format": format, "written_by": f"fade-kernels {_version()}"}, fh, indent=2)
                fh.write("\n")
    if processor is None:
        notes.append(f"no processor was given (or found beside the source): {out_dir} holds no "
                     f"preprocessor_config.json/tokenizer files, which vLLM and transformers pipelines need")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Path(out_dir)


__all__ = ["EXPORT_FORMATS", "EXPORT_MARKER", "ExportRefused", "check_export_destination", "check_fused_groups",
           "export_checkpoint"]
