"""Where a save may write: never into or over a folder the user owns.

A save replaces an existing output folder only when it is empty or is a checkpoint of ours: a
folder of regular files whose config.json has a `quantization_config` (or a CTranslate2
conversion's `fade_conversion.json`, or an export's `fade_export.json`), holding no file we would not have written. When
fade_checksums.json lists the files, only those (plus the quantization report) are allowed.
Anything else is refused before any work starts, with the folder and a way out named.

Saves build the new folder as `.<name>.tmp-<pid>-<random>` beside the output and move an old
one aside as `.<name>.old-<pid>-<random>` (io/checkpoint.py atomic_directory). A process killed
mid-save leaves those behind; `remove_stale_temporaries` deletes the ones whose process is gone,
and only names of exactly that form.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from fade_kernels.io.integrity import CHECKSUMS_NAME, read_checksums

REPORT_NAME = "quantization_report.json"
CONVERSION_MARKER = "fade_conversion.json"
EXPORT_MARKER = "fade_export.json"   # written by fade export (io/export.py) beside the weights
# Files save_pretrained / processor.save_pretrained / our writers put in a checkpoint folder.
_CHECKPOINT_FILE = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
    r"(pre)?processor_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|"
    r"vocab\.json|merges\.txt|normalizer\.json|vocabulary\.(txt|json)|chat_template\.(jinja|json)|"
    r"quantize_config\.json|" + re.escape(REPORT_NAME) + "|" + re.escape(CHECKSUMS_NAME) + "|"
    + re.escape(CONVERSION_MARKER) + "|" + re.escape(EXPORT_MARKER) + r")$")


class OutputDirError(ValueError):
    """An output folder that must not be written (a user's files, a file, not writable)."""


def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def temporary_prefix(out_dir: Path, kind: str) -> str:
    """mkdtemp prefix of a save's temporary ("tmp") or set-aside ("old") folder beside out_dir."""
    return f".{out_dir.name}.{kind}-{os.getpid()}-"


def foreign_entries(path: Path) -> list[str]:
    """Entries of folder `path` that a checkpoint of ours would not hold ([] when it could be ours)."""
    entries = sorted(path.iterdir())
    names = {p.name for p in entries}
    if not ({"config.json", CONVERSION_MARKER} & names):
        return [p.name for p in entries]
    recorded = None
    try:
        recorded = read_checksums(path)
    except ValueError:
        pass
    allowed = set(recorded) | {CHECKSUMS_NAME, REPORT_NAME} if recorded is not None else None
    foreign = []
    for entry in entries:
        if not entry.is_file() or entry.is_symlink():
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
        elif allowed is not None and entry.name not in allowed:
            foreign.append(entry.name)
        elif allowed is None and not _CHECKPOINT_FILE.match(entry.name):
            foreign.append(entry.name)
    if not foreign and CONVERSION_MARKER not in names and not _has_quantization_config(path / "config.json"):
        return ["config.json (a full-precision model, not a quantized checkpoint)"]
    return foreign


def _has_quantization_config(config_path: Path) -> bool:
    try:
        return "quantization_config" in json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def classify(path: str | os.PathLike) -> str:
    """"missing", "empty", "checkpoint" (one of ours), "file" (not a folder) or "foreign"."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "missing"
    if not path.is_dir() or path.is_symlink():
        return "file"
    if not any(path.iterdir()):
        return "empty"
    return "foreign" if foreign_entries(path) else "checkpoint"


def check_output_dir(path: str | os.PathLike, overwrite: bool, option: str = "out_dir",
                     overwrite_option: str = "overwrite=True") -> str:
    """Refuse an output folder a save must not write; returns its classify() kind.

    option / overwrite_option: how the caller names the argument and the permission to replace
    (the CLI passes "--out" and "--overwrite"). Refused: a file; the current folder or one of
    its parents; a non-empty folder that is not one of our checkpoints (always); one of our
    checkpoints unless `overwrite`; a parent folder where no file can be created.
    """
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    kind = classify(path)
    if kind == "file":
        raise OutputDirError(f"{option} {path} is a file, not a folder: choose a folder path for the checkpoint")
    cwd = Path(os.getcwd())
    if absolute == cwd or absolute in cwd.parents:
        raise OutputDirError(f"{option} {path} is the current folder or contains it: choose a new folder "
                             f"(e.g. {option} my-checkpoint); nothing was written")
    if kind == "foreign":
        shown = ", ".join(foreign_entries(path)[:3])
        raise OutputDirError(f"{option} {path} is not empty and is not a checkpoint written by fade-kernels (it holds "
                             f"{shown}): choose a new or empty folder; nothing was written")
    if kind == "checkpoint" and not overwrite:
        raise OutputDirError(f"{option} {path} already holds a checkpoint: pass {overwrite_option} to replace it, "
                             f"or choose another folder")
    check_writable(absolute.parent, option)
    return kind


def check_writable(folder: Path, option: str = "out_dir") -> None:
    """Create and delete a temporary file in `folder` (or its nearest existing ancestor, where the
    missing folders would be created): a read-only or full filesystem fails here, before any work."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{option}: {existing} is a file, so {folder} cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fade-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"{option}: cannot write in {existing} ({exc.strerror or exc}): choose a writable "
                             f"location") from None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` folders beside out_dir whose process is
    gone (left by a save that was killed). Returns the deleted paths."""
    out_dir = Path(os.path.abspath(out_dir))
    pattern = _temporary_pattern(out_dir.name)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _process_alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
