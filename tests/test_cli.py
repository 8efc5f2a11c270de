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


def test_eval_prints_overall_and_per_subset(capsys, tmp_path, monkeypatch):
    import fade_kernels.cli as cli
    import fade_kernels.eval.decode as decode
    from fade_kernels.eval.wer import wer_report
    from fade_kernels.data.corpus import Utterance

    utts = [Utterance("a", tmp_path / "a.wav", "hello world", "piper"), Utterance("b", tmp_path / "b.wav", "good day", "noisy")]
    report = wer_report(utts, ["hello word", "good day"])     # 1 error in 4 words
    report.update(n_utts=2, audio_seconds=6.0, decode_seconds=1.5, rtf=0.25)
    monkeypatch.setattr(cli, "load_cli_model", lambda spec: (None, None))
    monkeypatch.setattr(decode, "evaluate", lambda *a, **k: report)
    monkeypatch.setattr("fade_kernels.data.corpus.load_corpus", lambda path: utts)
    out_json = tmp_path / "r.json"
    assert main(["eval", "--model", "m", "--manifest", "x.jsonl", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "WER 25.00% on 2 utterances" in out
    assert "piper        WER 50.00% (1 utts)" in out and "noisy        WER 0.00% (1 utts)" in out
    assert json.loads(out_json.read_text())["wer"] == pytest.approx(0.25)
