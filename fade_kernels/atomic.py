"""Atomic file writes: readers see the old file or the complete new one, never a torn file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def fsync_directory(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # not supported on every filesystem
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path) then fsync and rename onto `path`: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write of a text file."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data, **dumps_kwargs) -> None:
    """atomic_write of json.dumps(data, indent=1, **dumps_kwargs)."""
    atomic_write_text(path, json.dumps(data, indent=1, **dumps_kwargs))
