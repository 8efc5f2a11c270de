"""Keep freed memory inside the process while the quantization pipeline runs (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh anonymous
mapping and unmaps it on free. The pipeline allocates and frees such buffers constantly (a large-v3
encoder activation is 61 MB, its FFN output 245 MB, a 5120-wide Hessian 105 MB), so every one of
them is faulted in page by page again: on the 2-core VMs we measured, a first touch costs about 1 µs
per 4 KB page, which made `gelu` on an FFN output 4x slower than on a reused buffer and a `tril` of
a 5120 x 5120 factor 4x slower than the copy itself.

`retain_freed_memory()` sets M_MMAP_MAX = 0 (every allocation comes from the heap, whose freed
chunks are reused) and a 2 GB M_TRIM_THRESHOLD (the heap's top is not given back) for the duration,
then restores glibc's defaults and trims the heap. The price is a resident set that stays at its
high-water mark until the block exits, plus fragmentation. Measured on a large-v3-shaped model, 16
utterances, 2 threads (`benchmarks/bench_quantize.py` with and without FADE_RETAIN_FREED_MEMORY=0,
one run after the other; benchmarks/results/quantize-large-v3): 405 s and 5.73 GiB peak RSS with it,
450 s and 3.49 GiB without. Set FADE_RETAIN_FREED_MEMORY=0 to turn it off (when RAM is tighter than
time); on other C libraries it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading

from fade_kernels.memory.mapped import c_library

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# glibc's defaults (malloc/malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD).
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
_RETAIN_TRIM_THRESHOLD = 2 ** 31 - 1   # mallopt takes an int

_lock = threading.Lock()
_depth = 0
_glibc_handle: ctypes.CDLL | None | bool = None


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (size_t fields; glibc >= 2.33)."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with mallopt and malloc_trim, else None."""
    global _glibc_handle
    if _glibc_handle is None:
        try:
            libc = c_library()
            libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            if hasattr(libc, "mallinfo2"):
                libc.mallinfo2.restype = MallInfo2
            _glibc_handle = libc
        except (OSError, AttributeError):
            _glibc_handle = False
    return _glibc_handle or None


def mallinfo2() -> MallInfo2 | None:
    """glibc's allocator statistics (hblkhd: bytes in mmap-served blocks), or None without glibc 2.33+."""
    libc = _glibc()
    return libc.mallinfo2() if libc is not None and hasattr(libc, "mallinfo2") else None


def retention_requested() -> bool:
    """Whether retain_freed_memory() acts in this process: the C library is glibc and
    FADE_RETAIN_FREED_MEMORY is not "0"."""
    return _glibc() is not None and os.environ.get("FADE_RETAIN_FREED_MEMORY", "1") != "0"


@contextlib.contextmanager
def retain_freed_memory():
    """Within the block, freed buffers stay in the process and are reused without page faults.

    Yields True when the setting is active (glibc, not disabled by FADE_RETAIN_FREED_MEMORY=0).
    Nested uses are counted: only the outermost exit restores the defaults and trims the heap."""
    global _depth
    libc = _glibc()
    enabled = retention_requested()
    if enabled:
        with _lock:
            if _depth == 0:
                enabled = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN_TRIM_THRESHOLD))
                if not enabled:
                    log.debug("mallopt refused; freed memory is returned to the system as usual")
                    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            if enabled:
                _depth += 1
    try:
        yield enabled
    finally:
        if enabled:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                    libc.malloc_trim(0)
