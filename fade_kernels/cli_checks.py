"""Checks `fade quantize` runs before any calibration work, so a bad path fails in a second.

Each raises a ValueError whose message names the option and the fix (the CLI prints it as one
line, exit code 2) or warns about input it will use differently than the user may expect.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from fade_kernels.io.output_dir import OutputDirError, check_output_dir, check_writable


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def check_quantize_outputs(out: Path, overwrite: bool, resume_dir: Path | None, report: str | None,
                           offload_dir: str | None) -> None:
    """--out must be new, empty, or (with --overwrite) one of our checkpoints, and writable; the
    resume folder, --report and --offload-dir must be creatable, and none of them inside --out
    (replacing --out would delete them)."""
    check_output_dir(out, overwrite, "--out", "--overwrite")
    for option, path in (("--resume-dir", resume_dir), ("--report", report), ("--offload-dir", offload_dir)):
        if path is None:
            continue
        path = Path(path)
        if _inside(path, out):
            raise OutputDirError(f"{option} {path} is inside --out {out}, which is replaced when the checkpoint is "
                                 f"saved: choose a folder outside it")
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"{option} {path} is a file, not a folder: choose a folder path")
        check_writable(path if path.is_dir() else path.parent, option)


def check_calibration_size(corpus: list, calib: str | None, n_calib: int) -> None:
    """An empty --calib is an error (never calibrate on nothing); asking --n-calib for more
    utterances than --calib holds warns and uses them all."""
    if calib is None:
        return
    if not corpus:
        raise ValueError(f"--calib {calib} holds no utterances: calibration needs at least one "
                         f"(one JSON line per clip, or a LibriSpeech-style folder)")
    if n_calib > len(corpus):
        warnings.warn(f"--n-calib {n_calib} is more than the {len(corpus)} utterances in --calib {calib}: "
                      f"calibrating on all {len(corpus)}", stacklevel=2)
