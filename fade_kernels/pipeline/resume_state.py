"""Resumable quantization runs: the pipeline's state after each finished block, on disk.

A run with checkpoint_dir=DIR writes, after every block (encoder, then decoder), everything the
rest of the run depends on, so a process killed at any instant (SIGKILL included) and restarted
with the same arguments continues after the last finished block and ends with bit-identical
codes, scales, zeros and report numbers:

  DIR/fingerprint.json                   what the run is (config, model, calibration data, batch
                                         size, chains, torch version); a restart with other
                                         settings is refused with ResumeMismatchError
  DIR/state.json                         the commit record: stage ("encoder" | "decoder"), next
                                         block, report layers so far, quantized layer names per
                                         finished block, current activation file
  DIR/<stack>-block<k>.safetensors       block k's state_dict after quantization: packed
                                         QuantLinear buffers (qweight, qzeros, scales, g_idx,
                                         bias) and the block's other tensors, including LayerNorm
                                         weights AWQ folded its scales into
  DIR/<stack>-acts<k>.safetensors        block k's outputs = block k+1's inputs, per batch:
                                         "q.<b>" (quantized chain), "fp.<b>" (full-precision chain)
  DIR/encoder_outputs.safetensors        the final-norm encoder outputs of both chains (read by
                                         the decoder's cross-attention), written once

Every file is written to a temporary name, fsynced and renamed into place (atomic on POSIX), and
state.json is written last: a block counts as finished only once state.json names it. A kill
between the renames leaves a complete earlier state plus files the restart overwrites.
state.json also records the sha256 of every file it names ("sha256": {file: hex}); a resumed run
checks a file against it before reusing it, so bytes damaged on disk raise ResumeCorruptError
instead of going into the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fade_kernels.io.integrity import IntegrityError, file_sha256
from fade_kernels.atomic import atomic_write

STATE_NAME = "state.json"
FINGERPRINT_NAME = "fingerprint.json"
ENCODER_OUTPUTS_NAME = "encoder_outputs.safetensors"
OFFLOAD_NAME = "activations"   # default ActivationCache folder of a run with a resume folder
LOCK_NAME = ".lock"
STATE_FORMAT = 1
# Every file this module writes; clear() deletes only these (never a user's other files).
_OWN_FILE = re.compile(r"^(state\.json|fingerprint\.json|encoder_outputs\.safetensors|\.lock|"
                       r"(encoder|decoder)-(block|acts)\d{3}\.safetensors|\..*\.tmp-\d+)$")


class ResumeMismatchError(ValueError):
    """The resume folder holds the state of a run with different settings or inputs."""


class ResumeFolderError(ValueError):
    """The resume folder path is a file, or a folder holding files that are not a resume state."""


class ResumeFolderBusyError(RuntimeError):
    """Another process holds the resume folder's lock."""


class ResumeCorruptError(IntegrityError):
    """A file of the resume folder differs from the sha256 state.json recorded when it was written."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _sampled_bytes(tensor: torch.Tensor, windows: int = 16, width: int = 256) -> bytes:
    # 16 evenly spaced runs of 256 contiguous values per tensor: hashing every weight of
    # whisper-large-v3 (6 GB) would take seconds, and strided single values would fault in nearly
    # every page of a memory-mapped checkpoint; this still tells two checkpoints apart.
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= windows * width:
        return _tensor_bytes(flat)
    starts = torch.linspace(0, flat.numel() - width, windows).long().tolist()
    return b"".join(_tensor_bytes(flat[start:start + width]) for start in starts)


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Class, config and a sampled hash of every tensor (name, shape, dtype, 4096 values each)."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    for key in ("_name_or_path", "transformers_version", "quantization_config"):
        config_dict.pop(key, None)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(_sampled_bytes(tensor))
    return {"class": type(model).__name__,
            "config_sha256": hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest(),
            "tensors_sha256": digest.hexdigest()}


def samples_fingerprint(samples) -> dict:
    """Count and sha256 of every CalibSample's encoder input, length and decoder tokens, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{tuple(sample.encoder_input.shape)}:{sample.encoder_input.dtype}:{sample.n_samples};".encode())
        digest.update(_tensor_bytes(sample.encoder_input))
        digest.update(_tensor_bytes(sample.decoder_ids.to(torch.int64)))
    return {"n_samples": len(samples), "sha256": digest.hexdigest()}


def run_fingerprint(model, samples, config, batch_size: int, two_chain: bool, adapter_name: str,
                    extra: dict | None = None) -> dict:
    """Everything a bit-identical continuation depends on, as a JSON-ready dict.

    extra: caller's identification of the run (the CLI passes model spec, manifest, seed)."""
    import fade_kernels

    return {"format": STATE_FORMAT, "config": config.to_dict(), "batch_size": int(batch_size),
            "two_chain": bool(two_chain), "adapter": adapter_name, "model": model_fingerprint(model),
            "samples": samples_fingerprint(samples), "torch": torch.__version__,
            "fade_kernels": fade_kernels.__version__, "extra": extra or {}}


def _normalized(data) -> object:
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _differences(saved: dict, wanted: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            out.append(key)
    return out


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _owns_storage(tensor: torch.Tensor) -> bool:
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share a storage; weights from_pretrained memory-mapped are
    # views into one file-sized storage, so those (only) are copied.
    plain = {name: t.detach() if _owns_storage(t) else t.detach().contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp)))


@dataclass
class SavedState:
    """What state.json records (see the module docstring)."""

    stage: str                      # "encoder" or "decoder": the stack being quantized
    next_block: int                 # first block of `stage` still to do
    layers: list[dict]              # LayerReport dicts of every finished block, in order
    quantized: dict[str, list[list[str]]]   # per stack, per finished block: its quantized layer names
    activations: str | None         # file with the inputs of `next_block` (None when next_block == 0)
    encoder_outputs: str | None     # file with both chains' encoder outputs (decoder stage)


def _is_own(path: Path) -> bool:
    return bool(_OWN_FILE.match(path.name)) if path.is_file() else path.name == OFFLOAD_NAME


class ResumeState:
    """The resume folder of one run. Opening it checks (or writes) the run's fingerprint.

    directory: created when missing. A folder that holds other files and no fingerprint.json is
    refused (it is not a fade resume folder); one whose fingerprint differs raises
    ResumeMismatchError naming the differing fields. One process at a time: an exclusive lock
    on DIR/.lock (released by the kernel when the process dies, even by SIGKILL).
    `offload_dir` (DIR/activations) is the default place for spilled activation caches; files
    a killed process left there are deleted on open.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, threads: int | None = None):
        self.dir = Path(directory)
        self.fingerprint = _normalized(fingerprint)
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.digests: dict[str, str] = {}   # sha256 of the files this state names (see _verified)
        fp_file = self.dir / FINGERPRINT_NAME
        if self.dir.exists() and not self.dir.is_dir():
            raise ResumeFolderError(f"resume folder {self.dir} exists and is not a directory")
        if self.dir.is_dir() and not fp_file.is_file() and any(not _is_own(p) for p in self.dir.iterdir()):
            raise ResumeFolderError(f"resume folder {self.dir} is not empty and holds no {FINGERPRINT_NAME}: "
                                    f"it is not a fade resume folder; choose an empty or new folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        if fp_file.is_file():
            saved = json.loads(fp_file.read_text())
            differ = _differences(saved.get("run", {}), self.fingerprint)
            if differ:
                raise ResumeMismatchError(
                    f"resume folder {self.dir} holds the state of a different run ({', '.join(differ)} "
                    f"differ): rerun with the same settings and data, or delete that folder / choose another one")
            if saved.get("threads") not in (None, self.threads):
                # Thread count can change float reduction order in GEMMs, so continuing is allowed
                # but only a same-thread-count restart is guaranteed bit-identical.
                warnings.warn(f"resuming a run started with {saved['threads']} torch threads on {self.threads}: "
                              f"the result may differ in the last bits from an uninterrupted run", stacklevel=3)
        else:
            for stale in self.dir.iterdir():   # files of a state whose fingerprint never landed
                if stale.is_file() and stale.name != LOCK_NAME:
                    stale.unlink()
            _write_json(fp_file, {"run": self.fingerprint, "threads": self.threads})
        for tmp in self.dir.glob(".*.tmp-*"):   # half-written files of a killed process
            tmp.unlink(missing_ok=True)
        shutil.rmtree(self.offload_dir, ignore_errors=True)   # spilled caches of a killed process

    @property
    def offload_dir(self) -> Path:
        return self.dir / OFFLOAD_NAME

    def _acquire_lock(self):
        import fcntl

        fh = open(self.dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise ResumeFolderBusyError(f"resume folder {self.dir} is in use by another process (its {LOCK_NAME} "
                                        f"is locked); one run per resume folder") from None
        return fh

    def close(self) -> None:
        """Release the folder's lock (the files stay)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ reading
    def load(self) -> SavedState | None:
        """The last committed state, or None when no block has finished yet."""
        path = self.dir / STATE_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            raise ResumeMismatchError(f"{path} has state format {data.get('format')!r}, this fade-kernels "
                                      f"writes {STATE_FORMAT}; delete {self.dir}")
        for name, digest in data.get("sha256", {}).items():
            self.digests.setdefault(name, digest)
        return SavedState(data["stage"], int(data["next_block"]), data["layers"], data["quantized"],
                          data.get("activations"), data.get("encoder_outputs"))

    def _verified(self, name: str) -> str:
        """Path of file `name` after checking it against its recorded sha256 (files of a state
        written before digests were recorded are read unchecked)."""
        path = self.dir / name
        recorded = self.digests.get(name)
        if recorded is not None and path.is_file() and file_sha256(path) != recorded:
            raise ResumeCorruptError(f"{path} does not match the sha256 recorded in {self.dir / STATE_NAME} when it "
                                     f"was written (damaged on disk): delete {self.dir} to start the run over")
        return str(path)

    def _record(self, name: str) -> str:
        self.digests[name] = file_sha256(self.dir / name)
        return name

    def block_tensors(self, stack: str, index: int) -> dict[str, torch.Tensor]:
        """Block `index` of `stack`'s saved state_dict (tensors in RAM)."""
        from safetensors.torch import load_file

        return load_file(self._verified(_block_name(stack, index)))

    def read_chains(self, name: str, put: Callable[[torch.Tensor], object]) -> tuple[list, list | None]:
        """Per-batch tensors of file `name` for both chains: ([put(q.0), ...], [put(fp.0), ...] or None).
        Tensors are read one at a time and handed to `put` (e.g. ActivationCache.put)."""
        from safetensors import safe_open

        q, fp = {}, {}
        with safe_open(self._verified(name), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                chain, batch = key.split(".")
                (q if chain == "q" else fp)[int(batch)] = put(reader.get_tensor(key))
        return [q[b] for b in sorted(q)], ([fp[b] for b in sorted(fp)] if fp else None)

    # ------------------------------------------------------------------ writing
    def save_encoder_outputs(self, q: list[torch.Tensor], fp: list[torch.Tensor] | None) -> str:
        """Write both chains' encoder outputs (float (B, T, D) per batch); returns the file name."""
        _save_tensors(self.dir / ENCODER_OUTPUTS_NAME, _chain_dict(q, fp))
        return self._record(ENCODER_OUTPUTS_NAME)

    def commit_block(self, stack: str, index: int, block_state: dict[str, torch.Tensor], outputs_q: list,
                     outputs_fp: list | None, state: SavedState) -> None:
        """Persist finished block `index` of `stack`: its tensors, its outputs on both chains, then
        `state` (which must already say stage=stack, next_block=index + 1) as the commit."""
        _save_tensors(self.dir / _block_name(stack, index), block_state)
        self._record(_block_name(stack, index))
        acts = _acts_name(stack, index)
        _save_tensors(self.dir / acts, _chain_dict(outputs_q, outputs_fp))
        self._record(acts)
        previous = self.load()
        state.activations = acts
        named = [_block_name(name, k) for name, blocks in state.quantized.items() for k in range(len(blocks))]
        named += [acts] + ([state.encoder_outputs] if state.encoder_outputs else [])
        _write_json(self.dir / STATE_NAME, {
            "format": STATE_FORMAT, "stage": state.stage, "next_block": state.next_block, "layers": state.layers,
            "quantized": state.quantized, "activations": state.activations, "encoder_outputs": state.encoder_outputs,
            "sha256": {name: self.digests[name] for name in named if name in self.digests}})
        # The previous block's outputs are no longer needed once the new state is committed.
        if previous is not None and previous.activations not in (None, acts):
            (self.dir / previous.activations).unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete this run's files (only names this module writes), then the folder if empty."""
        self.close()
        remove_resume_folder(self.dir)


def remove_resume_folder(directory: str | os.PathLike) -> None:
    """Delete the files a resume folder's runs wrote (never other files), then the folder if empty."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    shutil.rmtree(directory / OFFLOAD_NAME, ignore_errors=True)
    for path in directory.iterdir():
        if path.is_file() and _OWN_FILE.match(path.name):
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:   # the folder holds other files: they stay
        pass


def _block_name(stack: str, index: int) -> str:
    return f"{stack}-block{index:03d}.safetensors"


def _acts_name(stack: str, index: int) -> str:
    return f"{stack}-acts{index:03d}.safetensors"


def _chain_dict(q: list, fp: list | None) -> dict[str, torch.Tensor]:
    from fade_kernels.memory.cache import load

    out = {f"q.{b}": load(t) for b, t in enumerate(q)}
    if fp is not None:
        out.update({f"fp.{b}": load(t) for b, t in enumerate(fp)})
    return out
