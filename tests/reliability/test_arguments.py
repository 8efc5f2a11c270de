"""Arguments: a wrong --model, option or folder is one line naming it and the fix (exit 2), fast."""
from __future__ import annotations

import json

import pytest

import fade_kernels.models.source as source
from faults import error_line, quantize_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nonexistent_absolute_model_path(assets, tmp_path, fade):
    code, _, err = fade("transcribe", assets["audio"], "--model", tmp_path / "no" / "such" / "model")
    assert code == 2 and "no such folder" in error_line(err)


def test_relative_model_path_with_the_hub_unreachable(assets, tmp_path, monkeypatch, fade):
    # "models/whisper" has a hub id's shape: checked locally first, then one request (no retries).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def unreachable(repo_id):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(source, "probe_hub", unreachable)
    code, _, err = fade("transcribe", assets["audio"], "--model", "models/whisper")
    line = error_line(err)
    assert code == 2 and "is neither a local folder nor reachable on the hub" in line and calls == ["models/whisper"]


def test_relative_model_path_offline(assets, tmp_path, monkeypatch, fade):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(source, "probe_hub", lambda repo_id: pytest.fail("offline mode must not contact the hub"))
    code, _, err = fade("eval", "--model", "models/whisper", "--manifest", assets["calib"])
    assert code == 2 and "neither a local folder nor in the local hub cache" in error_line(err)


def test_hub_says_no_such_repository(assets, monkeypatch, fade):
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)   # its __init__ wants an HTTP response
        error.args = ("404 Client Error: Repository Not Found",)
        raise error
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(source, "probe_hub", missing)
    code, _, err = fade("transcribe", assets["audio"], "--model", "nobody/no-such-model-xyz")
    assert code == 2 and "neither a local folder nor a model on the hub" in error_line(err)


def test_folder_that_is_not_a_model(assets, tmp_path, fade):
    code, _, err = fade("transcribe", assets["audio"], "--model", tmp_path)
    assert code == 2 and "without config.json" in error_line(err)


@pytest.mark.parametrize("extra,message", [
    (["--damp", "-1"], "--damp: damp must be in [0, 1)"),
    (["--n-calib", "0"], "--n-calib must be at least 1"),
    (["--max-memory", "lots"], "--max-memory must be a size"),
])
def test_bad_solver_options(assets, tmp_path, fade, extra, message):
    code, _, err = fade(*quantize_args(assets, tmp_path / "q", *extra))
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "q").exists()


def test_resume_refusal_names_the_cli_flag(assets, tmp_path, fade):
    out = tmp_path / "q"
    assert fade(*quantize_args(assets, out, "--keep-resume-state"))[0] == 0
    code, _, err = fade(*quantize_args(assets, out, "--overwrite", "--bits", "3"))
    line = error_line(err)
    assert code == 2 and line.startswith("fade quantize: error: --resume-dir:")
    assert "different run (config.bits differ)" in line and "--no-resume" in line and "checkpoint_dir" not in line


def test_convert_ct2_into_non_empty_folder_names_a_real_option(tmp_path, fade):
    from fade_kernels.cli import build_parser

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    code, _, err = fade("convert-ct2", tmp_path / "src", out)
    assert code == 2 and "is not empty and is not a checkpoint written by fade-kernels" in error_line(err)
    assert (out / "mine.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"   # an earlier conversion: replaced only with --overwrite
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (earlier / "fade_conversion.json").write_text("{}")
    code, _, err = fade("convert-ct2", tmp_path / "src", earlier)
    line = error_line(err)
    assert code == 2 and "pass --overwrite to replace it" in line
    assert build_parser().parse_args(["convert-ct2", "src", str(earlier), "--overwrite"]).overwrite
    code, _, err = fade("convert-ct2", tmp_path / "src", earlier, "--overwrite")
    assert code == 2 and "src" in error_line(err)   # now it is the (missing) source that is refused
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "fade_conversion.json"]
