"""Fixtures of the fault tests: the tiny model folder and calibration manifest, a checkpoint
`fade quantize` wrote, and a runner for `fade` as a user types it (in process)."""
from __future__ import annotations

from pathlib import Path

import pytest

from faults import quantize_args, save_tiny_model, write_manifest, write_wav


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """model: the full-precision folder; calib: a 4-line manifest (1-1.5 s clips); audio: one clip."""
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_model(root / "model")
    clips = [write_wav(root / f"clip{k}.wav", 1.0 + 0.5 * (k % 2), seed=k) for k in range(4)]
    calib = write_manifest(root / "calib.jsonl", [{"audio": c.name, "text": f"hello world number {k}"}
                                                  for k, c in enumerate(clips)])
    return {"root": root, "model": model, "calib": calib, "audio": clips[0]}


@pytest.fixture(scope="session")
def checkpoint(assets, tmp_path_factory) -> Path:
    """A checkpoint `fade quantize` wrote (tests that damage it work on a copy)."""
    from fade_kernels.cli import main

    out = tmp_path_factory.mktemp("checkpoint") / "q"
    assert main(quantize_args(assets, out)) == 0
    return out


@pytest.fixture
def fade(capsys):
    """Run `fade ARGS` in this process: (exit code, stdout, stderr)."""
    from fade_kernels.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_info:   # argparse's own usage errors
            code = exit_info.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture(autouse=True)
def _tiny_models_use_one_thread(one_thread):
    yield
