"""How the `fade` command reports what went wrong: one line naming the problem and the fix.

Expected failures (bad arguments, bad or missing files, damaged checkpoints, a full disk) become
`fade <command>: error: <message>` with exit code 2; warnings become `fade <command>: warning:
<message>`. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import sys
import warnings
from typing import Iterator

# OSError numbers that describe the user's disk or permissions, not a bug.
_STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

# How libraries that wrap the OSError word a full disk.
_DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "os error 28")


def error_line(error: BaseException, storage_hint: str = "") -> str | None:
    """The one-line message for an expected failure, or None when `error` is a bug (re-raise it).

    storage_hint: appended to disk-full / permission messages (e.g. where the resume state is).
    """
    from safetensors import SafetensorError

    code = error.errno if isinstance(error, OSError) else None
    if code is None and any(text in str(error) for text in _DISK_FULL_TEXTS):
        code = errno.ENOSPC   # a library that wrapped the OSError (safetensors' Rust writer, torch)
    if code in _STORAGE_ERRORS:
        filename = getattr(error, "filename", None)
        where = f" while writing {filename}" if filename else ""
        message = f"{_STORAGE_ERRORS[code]}{where}: free some space or write elsewhere, then rerun"
        return _one_line(message + (f"; {storage_hint}" if storage_hint else ""))
    if isinstance(error, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError)):
        return _one_line(str(error))
    if isinstance(error, SafetensorError):
        return _one_line(f"a safetensors file is truncated or corrupt ({error})")
    return None


def _one_line(message: str) -> str:
    return " ".join(message.split())


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Print every warning raised inside as `fade <command>: warning: <message>` on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"fade {command}: warning: {_one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
