"""Kills: Ctrl-C prints one line saying where the resumable state is and the rerun continues to a
bit-identical checkpoint; a SIGKILL in the middle of a save leaves --out untouched and the next
run removes the save's temporary folder. Both run `fade` in a child process that signals itself
at a fixed point (after the first finished block; inside the checkpoint writer), so the signal
is real and the moment deterministic."""
from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap

from safetensors.torch import load_file

from faults import quantize_args

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.subprocess]

_CHILD = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import fade_kernels.pipeline.resume_state as resume
    import fade_kernels.io.checkpoint as checkpoint
    from fade_kernels.cli import main

    point, args = sys.argv[1], sys.argv[2:]
    # A shell starts background jobs with SIGINT ignored and Python keeps that; a user's Ctrl-C
    # reaches a foreground process, whose handler raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if point == "after-first-block":
        commit = resume.ResumeState.commit_block
        def commit_then_interrupt(self, *a, **k):
            commit(self, *a, **k)
            os.kill(os.getpid(), signal.SIGINT)
        resume.ResumeState.commit_block = commit_then_interrupt
    elif point == "inside-save":
        write = checkpoint.write_model_files
        def write_then_die(model, directory, *a, **k):
            write(model, directory, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_model_files = write_then_die
    sys.exit(main(args))
''')


def run_child(point: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, point, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_ctrl_c_says_how_to_resume_and_the_rerun_is_bit_identical(assets, checkpoint, tmp_path, fade):
    out = tmp_path / "q"
    child = run_child("after-first-block", quantize_args(assets, out))
    assert child.returncode == 130, child.stderr
    lines = [line for line in child.stderr.splitlines() if line.startswith("fade ")]
    assert lines == [f"fade quantize: interrupted; the finished blocks are kept in {out}.partial: rerun the same "
                     f"command to continue from there"], child.stderr
    assert "Traceback" not in child.stderr and not out.exists()
    assert (tmp_path / "q.partial" / "state.json").is_file()

    code, text, _ = fade(*quantize_args(assets, out))
    assert code == 0 and "resumed: 1 blocks restored" in text
    # `checkpoint` is the same command run without interruption.
    assert_same_tensors(load_file(str(out / "model.safetensors")), load_file(str(checkpoint / "model.safetensors")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_sigkill_during_save_leaves_out_untouched_and_the_next_run_cleans_up(assets, checkpoint, tmp_path, fade):
    import shutil

    from faults import tree_snapshot

    out = tmp_path / "q"
    shutil.copytree(checkpoint, out)
    before = tree_snapshot(out)
    child = run_child("inside-save", quantize_args(assets, out, "--overwrite", "--bits", "3"))
    assert child.returncode == -9, child.stderr
    assert tree_snapshot(out) == before   # the previous checkpoint is intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / "model.safetensors").is_file()

    code, text, _ = fade(*quantize_args(assets, out, "--overwrite", "--bits", "3"))
    assert code == 0 and "resumed: 4 blocks restored" in text   # every block was finished before the kill
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
