"""Resumable runs: a run killed with SIGKILL and restarted continues bit-identically."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fade_kernels import QuantConfig, quantize_model
from fade_kernels.pipeline import resume_state as resume_module
from fade_kernels.pipeline.resume_state import ResumeMismatchError, ResumeState
from fade_kernels.calib.samples import CalibSample

# 150 encoder positions = 300 mel frames (a 3 s window): the pipeline is the same as at 1500,
# ten times cheaper.
SHORT = dict(max_source_positions=150)

# Whole-model runs on small random models, and a killed subprocess; tiny matrices, one thread
# (the kill test's child uses one thread as well).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def short_whisper(seed=0, **overrides):
    from transformers import WhisperForConditionalGeneration

    from conftest import tiny_whisper_config

    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(tiny_whisper_config(**SHORT, **overrides)).eval()


def short_samples(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        seconds = 1 + i % 3
        features = torch.full((80, 300), -0.8)   # log-mel silence after the audio
        features[:, : seconds * 100] = torch.randn(80, seconds * 100, generator=generator)
        samples.append(CalibSample(features, seconds * 16000, torch.randint(3, 128, (4 + i,), generator=generator)))
    return samples


def quantized_tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 0
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def run(model, samples, config, **kwargs):
    return quantize_model(model, samples, config, batch_size=2, progress=False, **kwargs)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method,stop_after,avg_bits", [("fade", 1, None), ("fade", 2, None), ("awq", 3, None),
                                                        ("gptq", 4, None), ("gptq", 3, 4.6)])
def test_interrupted_run_resumes_bit_identically(method, stop_after, avg_bits, tmp_path, monkeypatch):
    """stop_after commits: 1 = mid-encoder, 2 = encoder done, 3 = mid-decoder, 4 = all blocks done
    (killed before the model was saved). AWQ checks folded LayerNorm scales survive the restore;
    avg_bits that restored blocks keep their mixed widths."""
    base, samples = short_whisper(), short_samples()
    config = QuantConfig(method=method, bits=3, group_size=32, avg_bits=avg_bits)
    reference = copy.deepcopy(base)
    expected = run(reference, samples, config)

    commits = []
    original = ResumeState.commit_block

    def failing(self, *args, **kwargs):
        original(self, *args, **kwargs)
        commits.append(1)
        if len(commits) == stop_after:
            raise Interrupt   # the state of `stop_after` blocks is on disk
    monkeypatch.setattr(ResumeState, "commit_block", failing)
    with pytest.raises(Interrupt):
        run(copy.deepcopy(base), samples, config, checkpoint_dir=tmp_path / "resume")
    monkeypatch.setattr(ResumeState, "commit_block", original)

    model = copy.deepcopy(base)
    report = run(model, samples, config, checkpoint_dir=tmp_path / "resume")
    assert report.resumed_blocks == stop_after
    if avg_bits is not None:
        assert set(report.layer_bits.values()) == {3, 4} and report.layer_bits == expected.layer_bits
    assert_identical(quantized_tensors(model), quantized_tensors(reference))
    assert [vars(layer) for layer in report.layers] == [vars(layer) for layer in expected.layers]
    assert model.config.quantization_config == reference.config.quantization_config
    assert not (tmp_path / "resume").exists()   # cleared after success


def test_different_settings_refuse_to_resume(tmp_path):
    base, samples = short_whisper(), short_samples(n=2)
    folder = tmp_path / "resume"
    run(copy.deepcopy(base), samples, QuantConfig(method="rtn", bits=4, group_size=32), checkpoint_dir=folder,
        keep_checkpoint=True)
    assert (folder / "state.json").is_file()
    with pytest.raises(ResumeMismatchError, match=r"different run \(config.bits differ\)"):
        run(copy.deepcopy(base), samples, QuantConfig(method="rtn", bits=3, group_size=32), checkpoint_dir=folder)
    with pytest.raises(ResumeMismatchError, match="samples.sha256"):
        run(copy.deepcopy(base), short_samples(n=2, seed=5), QuantConfig(method="rtn", bits=4, group_size=32),
            checkpoint_dir=folder)
    with pytest.raises(ResumeMismatchError, match="model.tensors_sha256"):
        run(short_whisper(seed=3), samples, QuantConfig(method="rtn", bits=4, group_size=32), checkpoint_dir=folder)
    with pytest.raises(ResumeMismatchError, match="batch_size"):
        quantize_model(copy.deepcopy(base), samples, QuantConfig(method="rtn", bits=4, group_size=32), batch_size=1,
                       progress=False, checkpoint_dir=folder)


def test_foreign_or_busy_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a fade resume folder"):
        ResumeState(tmp_path, {"any": 1})
    assert (tmp_path / "notes.txt").read_text() == "mine"
    first = ResumeState(tmp_path / "r", {"any": 1})
    with pytest.raises(RuntimeError, match="in use by another process"):
        ResumeState(tmp_path / "r", {"any": 1})
    first.clear()
    assert not (tmp_path / "r").exists()


def test_clear_deletes_only_its_own_files(tmp_path):
    state = ResumeState(tmp_path / "r", {"any": 1})
    (tmp_path / "r" / "encoder-block000.safetensors").write_bytes(b"x")
    state.offload_dir.mkdir()
    (state.offload_dir / "a.bin").write_bytes(b"x")
    (tmp_path / "r" / "user.txt").write_text("keep")
    state.clear()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["user.txt"]


CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from transformers import WhisperForConditionalGeneration
from fade_kernels import QuantConfig, quantize_model
from fade_kernels.pipeline.resume_state import ResumeState
from fade_kernels.calib.samples import CalibSample
from fade_kernels.io import save_quantized

model_dir, samples_file, resume_dir, out_dir, pause_after = sys.argv[1:6]
data = load_file(samples_file)
samples = [CalibSample(data["features"][i], int(data["n_samples"][i]), data["ids"][i, : int(data["lengths"][i])])
           for i in range(data["features"].shape[0])]
model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
original = ResumeState.commit_block

def pausing(self, stack, index, *args, **kwargs):
    original(self, stack, index, *args, **kwargs)
    if f"{stack}:{index}" == pause_after:
        time.sleep(60)   # the parent kills us here, with this block committed

ResumeState.commit_block = pausing
report = quantize_model(model, samples, QuantConfig(method="fade", bits=3, group_size=32), batch_size=2,
                        progress=False, checkpoint_dir=resume_dir, keep_checkpoint=True)
save_quantized(model, out_dir)
with open(out_dir + "/report.json", "w") as fh:
    json.dump(report.to_dict(), fh)
"""


@pytest.mark.subprocess
def test_sigkill_and_restart_gives_the_uninterrupted_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    from fade_kernels.io import save_quantized

    model_dir, resume_dir = tmp_path / "model", tmp_path / "resume"
    short_whisper().save_pretrained(model_dir)
    samples = short_samples()
    longest = max(len(s.decoder_ids) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.int64)
    for i, s in enumerate(samples):
        ids[i, : len(s.decoder_ids)] = s.decoder_ids
    save_file({"features": torch.stack([s.encoder_input for s in samples]),
               "n_samples": torch.tensor([s.n_samples for s in samples]), "ids": ids,
               "lengths": torch.tensor([len(s.decoder_ids) for s in samples])}, str(tmp_path / "samples.safetensors"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def command(out, pause_after):
        return [sys.executable, str(script), str(model_dir), str(tmp_path / "samples.safetensors"), str(resume_dir),
                str(out), pause_after]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command(tmp_path / "killed", "decoder:0"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    state_file = resume_dir / "state.json"
    deadline = time.monotonic() + 120
    try:
        # Kill once the first decoder block is committed: the restart must restore both encoder
        # blocks, decoder block 0, both chains' encoder outputs and decoder inputs.
        while True:
            assert child.poll() is None, child.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never finished decoder block 0"
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                if state["stage"] == "decoder" and state["next_block"] == 1:
                    break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()

    restarted = subprocess.run(command(tmp_path / "resumed", "never"), env=env, capture_output=True, text=True,
                               timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]

    # The uninterrupted run, here, with the child's thread count (the fixture's one thread).
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = quantize_model(model, samples, QuantConfig(method="fade", bits=3, group_size=32), batch_size=2,
                              progress=False)
    save_quantized(model, tmp_path / "reference")

    resumed_report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert resumed_report["resumed_blocks"] == 3
    assert resumed_report["layers"] == json.loads(json.dumps(expected.to_dict()["layers"]))
    assert_identical(load_file(str(tmp_path / "resumed" / "model.safetensors")),
                     load_file(str(tmp_path / "reference" / "model.safetensors")))


def test_cli_resume_flags(tmp_path, monkeypatch, capsys):
    """fade quantize: OUT.partial by default, kept with --keep-resume-state, a rerun restores every
    block, other settings are a one-line error, and a normal finish deletes the folder."""
    import fade_kernels.cli as cli
    import fade_kernels.sweep as sweep
    from safetensors.torch import load_file

    base = short_whisper()
    monkeypatch.setattr(cli, "load_cli_model", lambda spec: (copy.deepcopy(base), None))
    monkeypatch.setattr(sweep, "silence_samples", lambda model, processor: short_samples(n=2))
    out = tmp_path / "out"
    args = ["quantize", "--model", "m", "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out),
            "--quiet", "--max-memory", "0", "--overwrite"]
    assert cli.main(args + ["--keep-resume-state"]) == 0
    first = load_file(str(out / "model.safetensors"))
    assert (tmp_path / "out.partial" / "state.json").is_file()
    capsys.readouterr()

    assert cli.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "quantization_report.json").read_text())["resumed_blocks"] == 4
    assert_identical(load_file(str(out / "model.safetensors")), first)
    assert not (tmp_path / "out.partial").exists()

    assert cli.main(args + ["--keep-resume-state"]) == 0
    capsys.readouterr()
    assert cli.main(args[:6] + ["3"] + args[7:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fade quantize: error:") and "different run (config.bits differ)" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("extra,message", [(["--max-memory", "4 parsecs"], "--max-memory must be a size"),
                                           (["--no-resume", "--resume-dir", "x"], "--no-resume cannot be combined")])
def test_cli_rejects_bad_resume_and_memory_options(extra, message, capsys):
    from fade_kernels.cli import main

    assert main(["quantize", "--model", "m", "--out", "o", "--method", "rtn", *extra]) == 2
    assert message in capsys.readouterr().err
