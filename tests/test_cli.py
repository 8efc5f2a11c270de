"""The `fade` command line: bad arguments end in one line naming the argument (exit 2)."""
import json

import pytest

from fade_kernels.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_argparse_rejects_unsupported_bits_and_group(capsys):
    code, err = run(capsys, "quantize", "--model", "m", "--out", "o", "--bits", "5")
    assert code == 2 and "--bits" in err and "invalid choice" in err
    code, err = run(capsys, "quantize", "--model", "m", "--out", "o", "--group-size", "48")
    assert code == 2 and "--group-size" in err


def test_gptq_without_calibration_names_calib(capsys):
    assert main(["quantize", "--model", "m", "--out", "o", "--method", "gptq"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--calib is required" in err


def test_n_calib_must_be_positive(capsys):
    assert main(["quantize", "--model", "m", "--out", "o", "--calib", "c.jsonl", "--n-calib", "0"]) == 2
    assert "--n-calib must be at least 1" in capsys.readouterr().err


def test_transcribe_missing_audio_names_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.wav"
    assert main(["transcribe", str(missing), "--model", "m"]) == 2
    assert f"AUDIO file not found: {missing}" in capsys.readouterr().err


def test_eval_bad_manifest_is_one_line(capsys, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "missing.wav", "text": "hi"}) + "\n")
    assert main(["eval", "--model", "m", "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "m.jsonl:1" in err


def test_info_lists_the_reference_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "available" in out
