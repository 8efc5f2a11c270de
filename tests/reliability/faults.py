"""Helpers and fixtures of the fault tests: a tiny random Whisper model folder, audio, manifests,
a checkpoint `fade quantize` wrote, a runner for `fade` as a user types it (in process), and ways
to damage files and inspect what a command left behind.

The fixtures live here rather than in a second conftest.py, which would shadow tests/conftest.py
for the tests that import helpers from it (`from conftest import ...`); tests/conftest.py loads
this module as a plugin, so `assets` and `checkpoint` are built once per test run (pytest's session scope)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# A 2 s input window (200 mel frames -> 100 encoder frames) instead of Whisper's 30 s.
WINDOW_SECONDS = 2


def write_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(str(path), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return path


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def save_tiny_model(folder: Path, seed: int = 0, edit=None) -> Path:
    """A full-precision tiny Whisper + WhisperProcessor (a-z tokenizer) in `folder`; `edit(model)`
    may change the weights before saving."""
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    vocab.update({"Ġ": 26, "<|endoftext|>": 27, "<|startoftranscript|>": 28, "<|notimestamps|>": 29})
    scratch = folder.parent / f".{folder.name}-vocab"
    scratch.mkdir(exist_ok=True)
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"))
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
    config = WhisperConfig(vocab_size=32, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=50 * WINDOW_SECONDS, max_target_positions=192,
                           decoder_start_token_id=28, eos_token_id=27, pad_token_id=27, bos_token_id=27,
                           begin_suppress_tokens=None, suppress_tokens=None)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    torch.set_rng_state(generator_state)
    model.generation_config.no_timestamps_token_id = 29
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def quantize_args(assets, out, *extra) -> list[str]:
    return ["quantize", "--model", str(assets["model"]), "--calib", str(assets["calib"]), "--method", "rtn",
            "--bits", "4", "--group-size", "32", "--batch-size", "2", "--n-calib", "4", "--out", str(out), "--quiet",
            *extra]


def error_line(err: str) -> str:
    """The one line a failed command printed about the failure (asserts it is exactly one, and no
    traceback; progress bars of the libraries underneath may share stderr)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fade ") and ": error: " in line]
    assert len(lines) == 1, f"expected one error line on stderr, got:\n{err}"
    return lines[0]


def tree_snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (directories as 'dir')."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str) -> int:
    """File offset of the first data byte of tensor `name` in a safetensors file."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    return 8 + header_len + header[name]["data_offsets"][0]


def dead_pid() -> int:
    """The id of a process that has exited."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


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
