"""Give back the memory of finished weights that live in a memory-mapped checkpoint file.

transformers' from_pretrained memory-maps float32 safetensors files (copy-on-write): a weight is
a view into one mapping of the whole file. Dropping the tensor after its block is packed does not
unmap anything, so every page the pipeline ever read or wrote stays in the process's resident set
until the end: quantizing whisper-large-v3 ends with the whole 6.2 GB file resident on top of the
packed model. `release_file_pages` tells the kernel (madvise MADV_DONTNEED) that the pages
covered by a tensor are no longer needed: clean pages are dropped at once, copy-on-write pages
(the dequantized weights written during the solve) are discarded.

Only call it on tensors nothing will read again: a later read of a file-backed page sees the
file's original bytes (the full-precision weight), not what was written there. Memory that is
not a mapping of a regular file (heap, anonymous mappings) is never touched: there,
MADV_DONTNEED would zero live data.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import torch

_MADV_DONTNEED = 4
_libc = None


def c_library() -> ctypes.CDLL:
    """This process's C library, loaded once (errno kept for error messages). Raises OSError
    when there is none to load."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _madvise():
    madvise = c_library().madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of regular files (Linux /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue   # anonymous, [heap], [stack], ...
            path = fields[5].rstrip("\n")
            if path.endswith(" (deleted)") or path.startswith("/dev/"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, path))
    return out


def release_file_pages(tensors: list[torch.Tensor], mappings: list[tuple[int, int, str]] | None = None) -> int:
    """Drop the whole pages of each CPU tensor that lie inside a mapping of a regular file.

    tensors: contiguous CPU tensors of any dtype and shape (others are skipped). mappings:
    file_mappings(), read once for several calls.
    Returns the bytes released (0 off Linux, or when no tensor is file-backed).
    """
    if not sys.platform.startswith("linux"):
        return 0
    mappings = file_mappings() if mappings is None else mappings
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
            continue
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        for map_start, map_end, _ in mappings:
            if map_start <= begin and end <= map_end:
                first = (begin + page - 1) // page * page   # only pages no other tensor shares
                last = end // page * page
                if last > first:
                    if _madvise()(first, last - first, _MADV_DONTNEED) != 0:
                        raise OSError(ctypes.get_errno(), f"madvise failed: {os.strerror(ctypes.get_errno())}")
                    released += last - first
                break
    return released
