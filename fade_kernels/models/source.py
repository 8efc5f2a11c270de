"""Where a `--model` comes from: checked locally first, so a typo fails at once with one line.

A spec is `bundled:NAME`, a local folder, or a hub id (`owner/name`). A path that exists must be a
model folder (config.json, readable safetensors headers); one that does not exist is tried as a
hub id only when it has that shape, and then only after the local hub cache: one quick request
tells a missing repository from an unreachable hub (HF_HUB_OFFLINE=1 skips it), instead of
transformers' retries (about 30 s without a network).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from fade_kernels.models.bundled import BUNDLED_PREFIX

# huggingface_hub's repo id rule: [owner/]name, letters, digits, - _ . ; no leading/trailing - or .
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
HUB_TIMEOUT_SECONDS = 5.0


class ModelSourceError(ValueError):
    """A model spec that names no loadable model; the message says what to give instead."""


def check_model_folder(path: Path, option: str = "--model") -> None:
    """Raise ModelSourceError unless `path` looks like a saved transformers model folder whose
    safetensors files are complete (headers and byte ranges checked, no tensor read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_dir():
        raise ModelSourceError(f"{option} {path} is a file; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{option} {path} is a folder without config.json: not a saved model "
                               f"(give a model folder, a hub id such as openai/whisper-tiny.en, or bundled:tiny.en)")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelSourceError(f"{option}: {file} is truncated or corrupt ({exc}); download or save the model "
                                   f"again") from None


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def probe_hub(repo_id: str) -> None:
    """One request for the repository's metadata: raises whatever huggingface_hub raises."""
    from huggingface_hub import model_info

    model_info(repo_id, timeout=HUB_TIMEOUT_SECONDS)


def check_model_spec(spec: str, option: str = "--model") -> None:
    """Raise ModelSourceError (one line: the problem and what to give instead) unless `spec`
    names a loadable model: a bundled name, a model folder, or a hub id that is cached or exists."""
    if spec.startswith(BUNDLED_PREFIX):
        return
    path = Path(spec).expanduser()
    if path.exists():
        check_model_folder(path, option)
        return
    if not _HUB_ID.match(spec):
        raise ModelSourceError(f"{option} {spec}: no such folder (and not a hub id of the form owner/name)")
    if _cached_on_hub(spec):
        return
    if _hub_offline():
        raise ModelSourceError(f"{option} {spec} is neither a local folder nor in the local hub cache, and hub "
                               f"access is off (HF_HUB_OFFLINE): give the path of a model folder")
    try:
        probe_hub(spec)
    except Exception as exc:  # noqa: BLE001 - every failure means the same to the user
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            return   # exists; from_pretrained explains the access it needs
        if isinstance(exc, RepositoryNotFoundError):
            raise ModelSourceError(f"{option} {spec} is neither a local folder nor a model on the hub: check the "
                                   f"spelling (a folder path, a hub id such as openai/whisper-tiny.en, or "
                                   f"bundled:tiny.en)") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelSourceError(f"{option} {spec} is neither a local folder nor reachable on the hub ({reason}): give "
                               f"the path of a model folder, or connect to huggingface.co") from None
