"""Data: empty manifests, unreadable or empty audio, long clips, a short manifest and
punctuation-only references are errors or warnings naming the input, never a silent result."""
from __future__ import annotations

import pytest

from faults import WINDOW_SECONDS, error_line, quantize_args, write_manifest, write_wav

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bad_audio(tmp_path):
    """{kind: path}: a file libsndfile cannot read, and a valid WAV with no samples."""
    unreadable = tmp_path / "unreadable.wav"
    unreadable.write_bytes(b"RIFF....not audio at all")
    return {"unreadable": unreadable, "empty": write_wav(tmp_path / "empty.wav", 0.0)}


MESSAGES = {"unreadable": "cannot read audio file", "empty": "holds no samples"}


def test_empty_calibration_manifest_is_an_error(assets, tmp_path, fade):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = quantize_args(assets, tmp_path / "q", "--method", "gptq")
    args[args.index("--calib") + 1] = str(empty)
    code, _, err = fade(*args)
    assert code == 2 and "--calib" in error_line(err) and "holds no utterances" in err
    assert not (tmp_path / "q").exists()


def test_empty_eval_manifest_is_an_error_not_wer_zero(checkpoint, tmp_path, fade):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = fade("eval", "--model", checkpoint, "--manifest", empty)
    assert code == 2 and "holds no utterances" in error_line(err) and "WER" not in out


def test_eval_manifest_without_references(checkpoint, assets, tmp_path, fade):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": str(assets["audio"])}])
    code, out, err = fade("eval", "--model", checkpoint, "--manifest", manifest)
    assert code == 2 and "no utterance has a reference text" in error_line(err) and "WER" not in out


@pytest.mark.parametrize("kind", ["unreadable", "empty"])
def test_bad_audio_in_quantize(assets, tmp_path, fade, bad_audio, kind):
    manifest = write_manifest(tmp_path / "calib.jsonl", [{"audio": str(assets["audio"]), "text": "a b"},
                                                         {"audio": str(bad_audio[kind]), "text": "c d"}])
    args = quantize_args(assets, tmp_path / "q")
    args[args.index("--calib") + 1] = str(manifest)
    code, _, err = fade(*args)
    line = error_line(err)
    assert code == 2 and MESSAGES[kind] in line and bad_audio[kind].name in line
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("kind", ["unreadable", "empty"])
def test_bad_audio_in_eval(checkpoint, tmp_path, fade, bad_audio, kind):
    manifest = write_manifest(tmp_path / "eval.jsonl", [{"audio": str(bad_audio[kind]), "text": "a b"}])
    code, _, err = fade("eval", "--model", checkpoint, "--manifest", manifest)
    line = error_line(err)
    assert code == 2 and MESSAGES[kind] in line and bad_audio[kind].name in line


@pytest.mark.parametrize("kind", ["unreadable", "empty"])
def test_bad_audio_in_transcribe(checkpoint, fade, bad_audio, kind):
    code, _, err = fade("transcribe", bad_audio[kind], "--model", checkpoint)
    line = error_line(err)
    assert code == 2 and MESSAGES[kind] in line and bad_audio[kind].name in line


def test_clip_longer_than_the_window_and_short_manifest_warn(assets, tmp_path, fade):
    long_clip = write_wav(tmp_path / "long.wav", WINDOW_SECONDS + 1.5)
    manifest = write_manifest(tmp_path / "calib.jsonl", [{"audio": long_clip.name, "text": "a b c"},
                                                         {"audio": str(assets["audio"]), "text": "d e"}])
    args = quantize_args(assets, tmp_path / "q")
    args[args.index("--calib") + 1] = str(manifest)
    args[args.index("--n-calib") + 1] = "64"
    code, _, err = fade(*args)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("fade quantize: warning:")]
    assert any("long.wav is 3.5 s long; only its first 2 s" in line for line in warnings), err
    assert any("--n-calib 64 is more than the 2 utterances" in line for line in warnings), err


@pytest.mark.parametrize("reference", ["...", "?!", "…", " . , ", "[music]"])
def test_punctuation_only_reference_follows_the_empty_reference_rule(reference):
    from fade_kernels.eval.wer import normalize, wer_report, word_error_counts

    assert normalize(reference) == ""
    hypothesis = "one cat sat there"
    # The documented rule: an empty reference adds its hypothesis words as insertions and no
    # reference words; alone, any hypothesis is 100 % (not 400 %, not one substituted word).
    counts = word_error_counts([reference], [hypothesis])
    assert counts == word_error_counts([""], [hypothesis])
    assert counts["ref_words"] == 0 and counts["insertions"] == len(normalize(hypothesis).split())
    assert wer_report([{"text": reference}], [hypothesis])["wer"] == 1.0
    pooled = wer_report([{"text": reference}, {"text": "the dog ran"}], [hypothesis, "the dog ran"])
    assert pooled["ref_words"] == 3 and pooled["insertions"] == counts["insertions"]
