"""File digests: a checkpoint either loads exactly as it was saved or fails naming the damage.

`save_quantized` writes `fade_checksums.json` beside the files it saved:

  {"format": 1, "algorithm": "sha256",
   "files": {"model.safetensors": {"bytes": 94123456, "sha256": "<hex of the whole file>",
                                   "tensors": {"<tensor name>": "<hex of its data bytes>", ...}},
             "config.json": {"bytes": 2345, "sha256": "..."}, ...}}

The per-file sha256 is the one `sha256sum` prints. A safetensors file also records the sha256
of its header ("header_sha256") and of each tensor's byte range; since the header and the
tensors cover the whole file, checking those is checking every byte, and it runs on all cores
(one thread per tensor; sha256 itself is sequential, about 0.5-1.5 GB/s per core with the SHA
extensions), and names the damaged tensor. Other files are hashed whole.
benchmarks/bench_integrity.py measures the cost on a large-v3-sized checkpoint.

The resume folder of a quantization run (pipeline/resume_state.py) records the same per-file digests of
its block and activation files in its state and checks them before reusing a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from fade_kernels.io.checkpoint import CheckpointError, CheckpointNotFoundError

CHECKSUMS_NAME = "fade_checksums.json"
CHECKSUMS_FORMAT = 1
_CHUNK = 16 << 20


class IntegrityError(CheckpointError):
    """A file's bytes differ from the digest recorded when it was written."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a whole file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_ranges(path: Path) -> list[tuple[str, int, int]]:
    """(tensor name, first byte, end byte) in the file, sorted by position, from the header."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise IntegrityError(f"{path} is too short to be a safetensors file ({len(head)} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{path}: the safetensors header is corrupt ({exc})") from None
    base = 8 + header_len
    ranges = [(name, base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
              for name, info in header.items() if name != "__metadata__"]
    return sorted(ranges, key=lambda item: item[1])


def safetensors_digests(path: str | os.PathLike) -> tuple[str, str, dict[str, str]]:
    """(sha256 of the whole file, of its header, {tensor name: sha256 of its data bytes}), in one
    read of the file."""
    path = Path(path)
    ranges = _safetensors_ranges(path)
    header = hashlib.sha256()
    whole = hashlib.sha256()
    tensors: dict[str, str] = {}
    with open(path, "rb") as fh:
        position = 0
        for name, start, end in ranges:
            if start > position:
                gap = fh.read(start - position)   # the header (and any gap)
                whole.update(gap)
                if position == 0:
                    header.update(gap)
            part = hashlib.sha256()
            remaining = end - start
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise IntegrityError(f"{path} ends inside tensor {name!r} (truncated)")
                whole.update(chunk)
                part.update(chunk)
                remaining -= len(chunk)
            tensors[name] = part.hexdigest()
            position = end
        while chunk := fh.read(_CHUNK):
            whole.update(chunk)
    return whole.hexdigest(), header.hexdigest(), tensors


def describe_files(directory: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict]:
    """{relative file name: {"bytes", "sha256"[, "tensors"]}} for the files of `directory`
    (every regular file except the checksums file itself, or just `names`)."""
    root = Path(directory)
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != CHECKSUMS_NAME)
    out = {}
    for name in names:
        path = root / name
        entry: dict = {"bytes": path.stat().st_size}
        if name.endswith(".safetensors"):
            entry["sha256"], entry["header_sha256"], entry["tensors"] = safetensors_digests(path)
        else:
            entry["sha256"] = file_sha256(path)
        out[name] = entry
    return out


def write_checksums(directory: str | os.PathLike) -> Path:
    """Record the digests of every file in `directory` in its fade_checksums.json; returns that path."""
    root = Path(directory)
    data = {"format": CHECKSUMS_FORMAT, "algorithm": "sha256", "files": describe_files(root)}
    path = root / CHECKSUMS_NAME
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_checksums(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The recorded {file: entry} of a checkpoint directory, or None when it has no checksums file."""
    path = Path(directory) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("algorithm", "sha256") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is corrupt ({exc}): cannot verify the checkpoint") from None
    return files


def damaged_tensors(path: str | os.PathLike, recorded: dict[str, str]) -> list[str]:
    """Names of the tensors of safetensors file `path` whose bytes differ from `recorded`."""
    try:
        _, _, now = safetensors_digests(path)
    except IntegrityError:
        return []
    return [name for name, digest in recorded.items() if now.get(name) != digest]


def _range_sha256(fd: int, start: int, end: int) -> str:
    digest = hashlib.sha256()
    while start < end:
        chunk = os.pread(fd, min(_CHUNK, end - start), start)
        if not chunk:
            break
        digest.update(chunk)
        start += len(chunk)
    return digest.hexdigest()


def _parallel_safetensors_check(path: Path, entry: dict) -> str | None:
    """Compare the header and every tensor range of `path` with `entry`'s digests, one thread per
    range. Returns None when all match, else what differs ("in its header" / "tensor 'x'");
    raises LookupError when the ranges do not tile the file (then the whole-file digest decides)."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = _safetensors_ranges(path)
    size = path.stat().st_size
    header_end = ranges[0][1] if ranges else size
    covered = header_end
    for _, start, end in ranges:
        if start != covered:
            raise LookupError("gap between tensors")
        covered = end
    if covered != size or {name for name, _, _ in ranges} != set(entry["tensors"]):
        raise LookupError("the tensors do not tile the file")
    fd = os.open(path, os.O_RDONLY)
    try:
        if _range_sha256(fd, 0, header_end) != entry["header_sha256"]:
            return " (in its header)"
        workers = min(len(ranges), os.cpu_count() or 1, 16) or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:   # hashlib and pread release the GIL
            digests = list(pool.map(lambda r: _range_sha256(fd, r[1], r[2]), ranges))
    finally:
        os.close(fd)
    bad = [name for (name, _, _), digest in zip(ranges, digests) if digest != entry["tensors"][name]]
    if not bad:
        return None
    shown = ", ".join(repr(name) for name in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return f" (tensor {shown})" if len(bad) == 1 else f" (tensors {shown})"


def verify_file(path: Path, entry: dict, recorded_in: Path) -> None:
    """Raise IntegrityError (CheckpointNotFoundError when missing) unless `path` matches `entry`."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} is missing (listed in {recorded_in})")
    size = path.stat().st_size
    if size != entry.get("bytes", size):
        raise IntegrityError(f"{path} has {size} bytes, {entry['bytes']} were written (truncated or replaced "
                             f"since it was saved); restore the file or save the checkpoint again")
    if entry.get("tensors") and entry.get("header_sha256"):
        try:
            where = _parallel_safetensors_check(path, entry)
        except (LookupError, IntegrityError):
            where = ""   # not tiled by its tensors (or a damaged header): the whole-file digest decides
        else:
            if where is None:
                return
            raise IntegrityError(f"{path} does not match the sha256 recorded in {recorded_in}{where}: the file "
                                 f"was damaged or edited after saving; restore it or save the checkpoint again")
    if file_sha256(path) == entry["sha256"]:
        return
    where = ""
    if entry.get("tensors"):
        bad = damaged_tensors(path, entry["tensors"])
        if bad:
            shown = ", ".join(repr(name) for name in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            where = f" (tensor {shown})" if len(bad) == 1 else f" (tensors {shown})"
        else:
            where = " (in its header)"
    raise IntegrityError(f"{path} does not match the sha256 recorded in {recorded_in}{where}: the file was "
                         f"damaged or edited after saving; restore it or save the checkpoint again")


def verify_checksums(directory: str | os.PathLike) -> bool:
    """Check every file listed in `directory`'s fade_checksums.json. Returns False when there is
    no checksums file (nothing to verify); raises IntegrityError naming the first damaged file."""
    root = Path(directory)
    files = read_checksums(root)
    if files is None:
        return False
    for name, entry in files.items():
        verify_file(root / name, entry, root / CHECKSUMS_NAME)
    return True


PACKED_TENSOR_SUFFIXES = (".qweight", ".qzeros")


def packed_tensor_names(directory: str | os.PathLike, limit: int = 3) -> list[str]:
    """Up to `limit` names of packed quantized tensors (…qweight, …qzeros) in the safetensors files
    of `directory`, read from the headers only; [] when there are none (or no readable files)."""
    root = Path(directory)
    found: list[str] = []
    for path in sorted(root.glob("*.safetensors")):
        try:
            ranges = _safetensors_ranges(path)
        except (IntegrityError, OSError, KeyError, TypeError, ValueError):
            continue
        found += [name for name, _, _ in ranges if name.endswith(PACKED_TENSOR_SUFFIXES)]
        if len(found) >= limit:
            break
    return found[:limit]


def check_not_stripped_quantized(directory: str | os.PathLike) -> None:
    """Raise CheckpointError when `directory` holds packed quantized tensors but its config.json
    has no quantization_config: loading it as a full-precision model would give random linears."""
    root = Path(directory)
    if not root.is_dir():
        return
    config_path = root / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or "quantization_config" in config:
        return
    packed = packed_tensor_names(root)
    if packed:
        raise CheckpointError(f"{root} holds packed quantized tensors ({packed[0]}, ...) but {config_path} has no "
                              f"quantization_config: config.json was replaced or edited; restore the config.json "
                              f"saved with the checkpoint (loading it as a full-precision model would give "
                              f"randomly initialised layers)")
