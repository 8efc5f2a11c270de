"""Files: --out never deletes what it does not own, checks come before calibration, saves are
verified on load (sha256 per file), a killed save's leftovers are cleaned, a full disk is one line."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

import fade_kernels.cli as cli
from faults import dead_pid, error_line, flip_byte, quantize_args, tensor_offset, tree_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail loudly if a command gets as far as loading the model (the check must come first)."""
    def refuse(spec):
        raise AssertionError("the model was loaded before the output checks")
    monkeypatch.setattr(cli, "load_cli_model", refuse)


def test_out_dot_deletes_nothing(assets, tmp_path, monkeypatch, fade, no_calibration):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('mine')\n")
    (work / "notes.txt").write_text("keep me\n")
    before = tree_snapshot(tmp_path)
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, _, err = fade(*quantize_args(assets, out))
        assert code == 2 and "is the current folder or contains it" in error_line(err)
    assert tree_snapshot(tmp_path) == before


def test_non_empty_foreign_out_is_refused_untouched(assets, tmp_path, fade, no_calibration):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    (out / "config.json").write_text("{}")   # a config.json alone does not make it ours
    before = tree_snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, _, err = fade(*quantize_args(assets, out, *extra))
        line = error_line(err)
        assert code == 2 and "is not empty and is not a checkpoint written by fade-kernels" in line
        assert "notes.txt" in line
    assert tree_snapshot(tmp_path) == before


def test_out_that_is_a_file_or_under_a_file(assets, tmp_path, fade, no_calibration):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = fade(*quantize_args(assets, a_file))
    assert code == 2 and "is a file, not a folder" in error_line(err)
    code, _, err = fade(*quantize_args(assets, a_file / "q"))
    assert code == 2 and "a_file is a file" in error_line(err)
    assert a_file.read_text() == "x"


def test_unwritable_out_fails_before_calibration(assets, tmp_path, monkeypatch, fade, no_calibration):
    # A read-only filesystem, simulated: creating any file in the parent fails with EROFS
    # (chmod cannot make a folder read-only for root, which runs CI here).
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, _, err = fade(*quantize_args(assets, tmp_path / "q"))
    assert code == 2 and "cannot write in" in error_line(err) and "Read-only file system" in err


def test_resume_dir_inside_out_is_refused(assets, tmp_path, fade, no_calibration):
    code, _, err = fade(*quantize_args(assets, tmp_path / "q", "--resume-dir", tmp_path / "q" / "state"))
    assert code == 2 and "--resume-dir" in error_line(err) and "inside --out" in err


def test_replacing_our_checkpoint_needs_overwrite(assets, checkpoint, tmp_path, fade):
    out = tmp_path / "q"
    shutil.copytree(checkpoint, out)
    (tmp_path / "beside.txt").write_text("not ours")
    before = tree_snapshot(tmp_path)
    code, _, err = fade(*quantize_args(assets, out))
    assert code == 2 and "already holds a checkpoint: pass --overwrite" in error_line(err)
    assert tree_snapshot(tmp_path) == before
    code, _, _ = fade(*quantize_args(assets, out, "--overwrite", "--bits", "3"))
    assert code == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert (tmp_path / "beside.txt").read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "q"]


def test_checkpoint_with_a_users_file_is_not_replaced(assets, checkpoint, tmp_path, fade, no_calibration):
    out = tmp_path / "q"
    shutil.copytree(checkpoint, out)
    (out / "my-notes.md").write_text("mine")
    code, _, err = fade(*quantize_args(assets, out, "--overwrite"))
    assert code == 2 and "my-notes.md" in error_line(err)
    assert (out / "my-notes.md").read_text() == "mine"


def test_leftovers_of_a_killed_save_are_cleaned_by_the_next_run(assets, tmp_path, fade):
    out = tmp_path / "q"
    gone = dead_pid()
    stale = [tmp_path / f".q.tmp-{gone}-abc123", tmp_path / f".q.old-{gone}-def456"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / ".q.tmp-1-zzz999"          # pid 1 is alive: a save in progress elsewhere
    unrelated = tmp_path / ".q.tmp-notes"        # not a name our saves use
    for folder in (live, unrelated):
        folder.mkdir()
    code, _, _ = fade(*quantize_args(assets, out))
    assert code == 0
    assert not any(folder.exists() for folder in stale)
    assert live.is_dir() and unrelated.is_dir()


@pytest.mark.parametrize("target", ["qweight", "scales", "embed_tokens"])
def test_flipped_byte_in_weights_names_file_and_tensor(checkpoint, tmp_path, fade, target):
    from fade_kernels.io import CheckpointError, load_quantized

    damaged = tmp_path / "q"
    shutil.copytree(checkpoint, damaged)
    name = {"qweight": "model.encoder.layers.1.fc1.qweight", "scales": "model.decoder.layers.0.self_attn.k_proj.scales",
            "embed_tokens": "model.decoder.embed_tokens.weight"}[target]
    weights = damaged / "model.safetensors"
    flip_byte(weights, tensor_offset(weights, name) + 1)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors does not match the sha256.*tensor '{name}'"):
        load_quantized(damaged)
    code, _, err = fade("transcribe", checkpoint.parent / "missing.wav", "--model", damaged)
    assert code == 2   # the audio is checked first
    code, _, err = fade("eval", "--model", damaged, "--manifest", _one_line_manifest(tmp_path))
    assert code == 2 and f"tensor '{name}'" in error_line(err)


def _one_line_manifest(tmp_path):
    from faults import write_manifest, write_wav

    write_wav(tmp_path / "a.wav", 1.0)
    return write_manifest(tmp_path / "eval.jsonl", [{"audio": "a.wav", "text": "hello"}])


@pytest.mark.parametrize("damage,message", [
    (lambda q: flip_byte(q / "tokenizer.json", 10), r"tokenizer\.json does not match the sha256"),
    (lambda q: (q / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:-64]),
     r"model\.safetensors is truncated or corrupt"),
    (lambda q: (q / "generation_config.json").unlink(), r"generation_config\.json is missing"),
])
def test_other_damage_is_named(checkpoint, tmp_path, fade, damage, message):
    import re

    damaged = tmp_path / "q"
    shutil.copytree(checkpoint, damaged)
    damage(damaged)
    code, _, err = fade("eval", "--model", damaged, "--manifest", _one_line_manifest(tmp_path))
    assert code == 2 and re.search(message, error_line(err))


def test_checkpoint_without_quantization_config_is_an_error(checkpoint, tmp_path, fade):
    stripped = tmp_path / "q"
    shutil.copytree(checkpoint, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    (stripped / "fade_checksums.json").unlink()   # as if the whole folder had been re-assembled by hand
    code, _, err = fade("eval", "--model", stripped, "--manifest", _one_line_manifest(tmp_path))
    line = error_line(err)
    assert code == 2 and "holds packed quantized tensors" in line and "no quantization_config" in line


def test_truncated_full_precision_model(assets, tmp_path, fade):
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = fade("transcribe", assets["audio"], "--model", model)
    assert code == 2 and "model.safetensors is truncated or corrupt" in error_line(err)


def _os_error(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _safetensors_error(path):
    # What safetensors' Rust writer raises when the OS says ENOSPC.
    from safetensors import SafetensorError

    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')


@pytest.mark.parametrize("make_error", [_os_error, _safetensors_error])
def test_full_disk_is_one_line_and_keeps_the_resume_state(assets, tmp_path, monkeypatch, fade, make_error):
    # ENOSPC, simulated: the checkpoint writer fails as a full disk makes it fail (no tmpfs
    # can be mounted without privileges here).
    import fade_kernels.io.checkpoint as checkpoint_module

    real_writer = checkpoint_module.write_model_files

    def full_disk(model, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"\0" * 100)
        raise make_error(directory / "model.safetensors")
    monkeypatch.setattr(checkpoint_module, "write_model_files", full_disk)
    out = tmp_path / "q"
    code, _, err = fade(*quantize_args(assets, out))
    line = error_line(err)
    assert code == 2 and "no space left on the device" in line
    assert f"the finished blocks are kept in {out}.partial" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.partial"]   # no temporary left, no --out
    monkeypatch.setattr(checkpoint_module, "write_model_files", real_writer)
    code, out_text, _ = fade(*quantize_args(assets, out))
    assert code == 0 and "resumed: 4 blocks restored" in out_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_damaged_resume_block_is_not_reused(assets, tmp_path, fade):
    out = tmp_path / "q"
    assert fade(*quantize_args(assets, out, "--keep-resume-state"))[0] == 0
    shutil.rmtree(out)
    block = tmp_path / "q.partial" / "encoder-block001.safetensors"
    flip_byte(block, block.stat().st_size - 3)
    code, _, err = fade(*quantize_args(assets, out))
    line = error_line(err)
    assert code == 2 and line.startswith("fade quantize: error: --resume-dir:")
    assert "encoder-block001.safetensors does not match the sha256" in line and "--no-resume" in line
    assert not out.exists()
