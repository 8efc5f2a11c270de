"""Activation caches under a RAM budget: beyond it, tensors live in files, memory-mapped on use.

The pipeline keeps, per calibration batch, the next block's input on the quantized chain and
(QEP/FADE) on the full-precision chain, the encoder outputs both chains' cross-attention reads,
and the full-precision twin's group inputs of the current block. For whisper-large-v3 on a few
dozen utterances that is gigabytes; `ActivationCache` holds them in RAM while the running total
of its RAM-resident bytes stays within `max_bytes`, and writes any tensor that would exceed the
budget to a raw file in `directory`.

    cache = ActivationCache(max_bytes=parse_size("4GB"), directory="/scratch")
    entry = cache.put(hidden)            # CachedTensor, in RAM or on disk
    x = entry.get()                      # the tensor: itself, or a copy-on-write memory map
    entry = cache.put(new, replaces=entry)   # frees the old entry first (bytes or file)
    cache.close()                        # deletes every file the cache wrote

An on-disk entry is mapped afresh by each get() (torch.from_file, MAP_PRIVATE): the mapping and
the pages it brought into the process go away when the returned tensor is dropped, so only the
batch being processed is resident; the page cache keeps recently used files warm. The values
are the stored bits, so results are identical to the in-RAM path. Do not point `directory` at a
tmpfs (often /tmp): its files are RAM.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str | None, name: str = "max_memory") -> int | None:
    """Bytes from 4000000, "4GB", "512MiB", "1.5g" (decimal units; KiB/MiB/GiB binary). None stays None.

    name: the argument named in the error message."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a byte count or a size such as '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name} must be a byte count or a size such as '4GB' or '512MiB', got {value!r}")
        number = float(match.group(1)) * _UNITS[unit]
    if number < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return int(number)


class CachedTensor:
    """One cached tensor: in RAM (`tensor`) or in a raw file (`path`, with shape and dtype)."""

    __slots__ = ("tensor", "path", "shape", "dtype", "nbytes")

    def __init__(self, tensor: torch.Tensor | None, path: Path | None, shape: tuple, dtype: torch.dtype, nbytes: int):
        self.tensor, self.path, self.shape, self.dtype, self.nbytes = tensor, path, shape, dtype, nbytes

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def get(self) -> torch.Tensor:
        """The tensor (shape, dtype as stored). On disk: a fresh copy-on-write memory map."""
        if self.path is None:
            return self.tensor
        numel = 1
        for size in self.shape:
            numel *= size
        if numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.from_file(str(self.path), shared=False, size=numel, dtype=self.dtype).view(self.shape)


def load(value):
    """value.get() for a CachedTensor, anything else unchanged."""
    return value.get() if isinstance(value, CachedTensor) else value


def materialize(call: dict) -> dict:
    """A copy of a block call's kwargs with every CachedTensor replaced by its tensor."""
    return {key: load(value) for key, value in call.items()}


class ActivationCache:
    """Tensors in RAM up to `max_bytes` (None: no limit, never touches the disk), the rest in files.

    max_bytes: budget for the RAM-resident entries of this cache (the model, the full-precision
      twin block and solver temporaries come on top). 0 puts every entry on disk.
    directory: where files go (a fresh sub-directory is created on first spill and removed by
      close()); default tempfile.gettempdir().
    """

    def __init__(self, max_bytes: int | None = None, directory: str | os.PathLike | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be None or non-negative, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        self.ram_bytes = 0          # bytes of the live RAM entries
        self.disk_bytes = 0         # bytes of the live file entries
        self.peak_ram_bytes = 0
        self.spilled_bytes = 0      # total ever written to disk
        self.write_seconds = 0.0
        self._folder: Path | None = None
        self._counter = itertools.count()

    def put(self, tensor: torch.Tensor, replaces: "CachedTensor | None" = None) -> CachedTensor:
        """Cache `tensor` (any dtype, any shape); `replaces` is released first.

        The tensor is kept by reference when it fits in the budget; else it is written to disk
        and the caller's reference should be dropped for the RAM to be freed."""
        if replaces is not None:
            self.release(replaces)
        if tensor.requires_grad:
            tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes is None or self.ram_bytes + nbytes <= self.max_bytes:
            self.ram_bytes += nbytes
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return CachedTensor(tensor, None, tuple(tensor.shape), tensor.dtype, nbytes)
        return self._spill(tensor, nbytes)

    def _spill(self, tensor: torch.Tensor, nbytes: int) -> CachedTensor:
        import time

        start = time.perf_counter()
        if self._folder is None:
            parent = self.directory if self.directory is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="fade-activations-", dir=parent))
        path = self._folder / f"{next(self._counter):06d}.bin"
        # Raw bytes through a uint8 view: works for every dtype (numpy has no bfloat16).
        flat = tensor.contiguous().reshape(-1)
        with open(path, "wb") as fh:
            if nbytes:
                fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self.disk_bytes += nbytes
        self.spilled_bytes += nbytes
        self.write_seconds += time.perf_counter() - start
        return CachedTensor(None, path, tuple(tensor.shape), tensor.dtype, nbytes)

    def release(self, entry: "CachedTensor | None") -> None:
        """Forget `entry`: subtract its bytes, delete its file. Releasing twice is harmless."""
        if not isinstance(entry, CachedTensor) or entry.nbytes < 0:
            return
        if entry.path is None:
            self.ram_bytes -= entry.nbytes
            entry.tensor = None
        else:
            self.disk_bytes -= entry.nbytes
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
        entry.nbytes = -1   # marks it released

    def close(self) -> None:
        """Delete the spill folder (every file this cache wrote)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
