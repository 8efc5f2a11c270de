"""save_quantized / load_quantized: bit-exact round trips, errors on bad files, atomic writes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    MoonshineConfig,
    MoonshineForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
    pipeline,
)

from fade_kernels.config import QuantConfig
from fade_kernels.io import (
    CheckpointError,
    CheckpointNotFoundError,
    load_processor,
    load_quantized,
    quantized_modules,
    save_quantized,
)
from fade_kernels.io import checkpoint as ckpt
from fade_kernels.nn import QuantLinear, replace_linears

WHISPER = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=64,
               max_target_positions=32, num_mel_bins=80, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None)
MEL_FRAMES = 2 * WHISPER["max_source_positions"]  # Whisper's encoder wants exactly this many frames


def block_linears(model: nn.Module) -> list[str]:
    """Encoder/decoder nn.Linear names: not proj_out, convs or embeddings (docs/methods.md §7)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def quantize(model: nn.Module, bits: int, group_size: int, sym: bool, names: list[str] | None = None) -> nn.Module:
    replace_linears(model, names or block_linears(model),
                    lambda name, linear: QuantLinear.from_linear(linear, bits, group_size, sym))
    return model.eval()


def tiny_whisper(bits: int = 4, group_size: int = 32, sym: bool = False, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return quantize(WhisperForConditionalGeneration(WhisperConfig(**{**WHISPER, **overrides})), bits, group_size, sym)


def tiny_moonshine(bits: int = 3, group_size: int = 32, sym: bool = True) -> nn.Module:
    torch.manual_seed(1)
    config = MoonshineConfig(vocab_size=100, hidden_size=64, intermediate_size=128, encoder_num_hidden_layers=2,
                             decoder_num_hidden_layers=2, encoder_num_attention_heads=4,
                             decoder_num_attention_heads=4, encoder_num_key_value_heads=4,
                             decoder_num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return quantize(MoonshineForConditionalGeneration(config), bits, group_size, sym)


def whisper_logits(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    features = torch.randn(1, WHISPER["num_mel_bins"], MEL_FRAMES, generator=gen)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=torch.tensor([[3, 5, 6, 7]])).logits


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[nn.Module, Path]:
    """One saved 3-bit asymmetric checkpoint; tests that damage it work on a copy."""
    model = tiny_whisper(3, 32, False)
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save_quantized(model, path, quant_config={"method": "rtn"})
    return model, path


@pytest.fixture
def copy_of(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("bits,group_size,sym", [(3, 32, False), (3, -1, True), (4, 32, True), (4, -1, False)])
def test_whisper_round_trip_is_bit_exact(tmp_path, bits, group_size, sym):
    model = tiny_whisper(bits, group_size, sym)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")

    assert not loaded.training
    layers, loaded_layers = quantized_modules(model), quantized_modules(loaded)
    assert list(layers) == list(loaded_layers) == block_linears(WhisperForConditionalGeneration(WhisperConfig(**WHISPER)))
    for name, layer in layers.items():
        other = loaded_layers[name]
        assert (other.bits, other.group_size, other.sym) == (layer.bits, layer.group_size, layer.sym)
        for buf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            a, b = getattr(layer, buf), getattr(other, buf)
            assert (a is None) == (b is None), (name, buf)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (name, buf)
    assert_same_state(model, loaded)
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight  # re-tied, not a copy
    if (bits, group_size, sym) == (3, 32, False):  # equal state implies equal outputs; check once
        assert torch.equal(whisper_logits(model), whisper_logits(loaded))


def test_tied_weight_is_stored_once(saved):
    _, path = saved
    names = list(load_file(path / "model.safetensors"))
    assert "model.decoder.embed_tokens.weight" in names and "proj_out.weight" not in names


@pytest.mark.slow
def test_generate_matches_and_loaded_model_is_not_materialised_twice(saved):
    model, path = saved
    loaded = load_quantized(path)
    features = torch.randn(1, WHISPER["num_mel_bins"], MEL_FRAMES, generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(input_features=features, **kwargs),
                       loaded.generate(input_features=features, **kwargs))
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))


def test_moonshine_round_trip_recomputes_rotary_buffers(tmp_path):
    model = tiny_moonshine()
    save_quantized(model, tmp_path / "m")
    loaded = load_quantized(tmp_path / "m")
    assert_same_state(model, loaded)
    # inv_freq is a non-persistent buffer, absent from the file: it must be computed, not left empty.
    for stack in ("encoder", "decoder"):
        assert torch.equal(getattr(model.model, stack).rotary_emb.inv_freq, getattr(loaded.model, stack).rotary_emb.inv_freq)
    audio = torch.randn(1, 2000, generator=torch.Generator().manual_seed(2))
    dec = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(input_values=audio, decoder_input_ids=dec).logits,
                           loaded(input_values=audio, decoder_input_ids=dec).logits)


def test_dtype_casts_only_full_precision_weights(saved):
    _, path = saved
    loaded = load_quantized(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    fc1 = loaded.model.encoder.layers[0].fc1
    assert (fc1.qweight.dtype, fc1.scales.dtype, fc1.bias.dtype) == (torch.int32, torch.float16, torch.float32)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        load_quantized(path, dtype=torch.int32)


def test_parameters_are_built_on_meta_buffers_are_real():
    with ckpt._parameters_on_meta():
        linear = nn.Linear(8, 4)
        norm = nn.BatchNorm1d(4)
    assert linear.weight.is_meta and linear.bias.is_meta and norm.weight.is_meta
    assert not norm.running_mean.is_meta
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is undone


def test_resave_of_loaded_model_keeps_config(saved, tmp_path):
    _, path = saved
    loaded = load_quantized(path)
    save_quantized(loaded, tmp_path / "again")
    again = load_quantized(tmp_path / "again")
    assert again.config.quantization_config["method"] == "rtn"
    assert_same_state(loaded, again)


@pytest.mark.slow
def test_pipeline_with_loaded_model_and_processor(tmp_path):
    vocab = {f"t{i}": i for i in range(90)}
    vocab.update({"<|endoftext|>": 90, "<|startoftranscript|>": 91, "<|notimestamps|>": 92})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    # 1 s chunks at hop 125 give the 128 frames the tiny encoder accepts.
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1, hop_length=125)
    model = tiny_whisper(4, 32, False)
    save_quantized(model, tmp_path / "ckpt", processor=WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer))

    processor = load_processor(tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    samples = np.random.RandomState(0).randn(8000).astype(np.float32) * 0.1
    kwargs = {"generate_kwargs": {"max_new_tokens": 5}}
    asr = pipeline("automatic-speech-recognition", model=loaded, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device="cpu")
    reference = pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                         feature_extractor=extractor, device="cpu")
    out = asr({"raw": samples, "sampling_rate": 16000}, **kwargs)  # the pipeline consumes the dict
    assert out["text"] and out == reference({"raw": samples, "sampling_rate": 16000}, **kwargs)


def test_load_processor_without_processor_files(saved):
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        load_processor(saved[1])


# ----------------------------------------------------------------------------------------------
# quantization_config


def test_quantization_config_schema(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fade" and qc["checkpoint_format"] == "fade" and qc["format_version"] == 1
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["method"]) == (3, 32, False, False, "rtn")
    assert qc["modules"]["model.decoder.layers.1.encoder_attn.k_proj"] == {"bits": 3, "group_size": 32, "sym": False}
    assert len(qc["modules"]) == 32
    assert (path / "generation_config.json").is_file()


def test_quantization_config_mixed_layers_and_quant_config():
    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    names = block_linears(model)
    quantize(model, 4, -1, True, names[:3])
    quantize(model, 3, 32, False, names[3:])
    qc = ckpt.build_quantization_config(model, QuantConfig(method="gptq", bits=3, group_size=32, act_order=True))
    assert qc["modules"][names[0]] == {"bits": 4, "group_size": -1, "sym": True}
    assert qc["modules"][names[5]] == {"bits": 3, "group_size": 32, "sym": False}
    assert (qc["method"], qc["desc_act"], qc["damp"]) == ("gptq", True, 0.01)
    with pytest.raises(ValueError, match="may not set"):
        ckpt.build_quantization_config(model, {"modules": {}})


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(WhisperForConditionalGeneration(WhisperConfig(**WHISPER)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# Bad checkpoints


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


FC1 = "model.encoder.layers.0.fc1"


@pytest.mark.parametrize("damage,error,match", [
    (lambda p: (p / "config.json").unlink(), FileNotFoundError, r"config\.json is missing"),
    (lambda p: (p / "config.json").write_text('{"model_type": "whis'), CheckpointError, r"config\.json is not valid JSON"),
    (lambda p: _edit_config(p, lambda c: c.pop("quantization_config")), CheckpointError, "has no quantization_config"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(checkpoint_format="awq")),
     CheckpointError, r"checkpoint_format is 'awq'; accepted: 'fade'"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(quant_method="gptq")),
     CheckpointError, "checkpoint_format 'fade' is not supported; accepted values: 'gptq'"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["modules"][FC1].update(bits=5)),
     CheckpointError, f"module '{FC1}' has bits=5"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["modules"].update({"model.nope": c["quantization_config"]["modules"][FC1]})),
     CheckpointError, "'model.nope' does not exist"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["modules"][FC1].update(group_size=-1)),
     CheckpointError, rf"{FC1}\.(qzeros|scales)' has shape \(2, \d+\).*expects \(1, \d+\)"),
    (lambda p: _edit_config(p, lambda c: c.pop("architectures")), CheckpointError, "no 'architectures'"),
    (lambda p: (p / "model.safetensors").unlink(), FileNotFoundError, r"model\.safetensors is missing"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
     CheckpointError, r"model\.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 3), CheckpointError, "truncated or corrupt"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{FC1}.qweight": t[f"{FC1}.qweight"][:-3]})),
     CheckpointError, rf"model\.safetensors: tensor '{FC1}.qweight' has shape \(3, 128\).*expects \(6, 128\)"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{FC1}.qzeros": t[f"{FC1}.qzeros"].long()})),
     CheckpointError, rf"'{FC1}.qzeros' has dtype torch.int64, expected torch.int32"),
    (lambda p: _edit_tensors(p, lambda t: t.pop(f"{FC1}.scales")), CheckpointError, f"missing from the checkpoint: {FC1}.scales"),
    (lambda p: _edit_tensors(p, lambda t: t.update(extra=torch.zeros(1))), CheckpointError, "unexpected tensors.*extra"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{FC1}.g_idx"].fill_(7)), CheckpointError, rf"{FC1}.g_idx has values outside \[0, 1\]"),
])
def test_bad_checkpoint_raises_clear_error(copy_of, damage, error, match):
    # verify=False: the recorded digests would catch every one of these first (tests/reliability);
    # the structural checks below them protect checkpoints saved without digests.
    damage(copy_of)
    with pytest.raises(error, match=match):
        load_quantized(copy_of, verify=False)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        load_quantized(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------------------------
# Atomic save


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


class _FailingProcessor:
    """Writes a file, then dies: a save interrupted after the weights were written."""

    def save_pretrained(self, directory):
        Path(directory, "preprocessor_config.json").write_text("{}")
        raise RuntimeError("disk full")


def test_failed_save_leaves_previous_checkpoint_intact(saved, copy_of):
    before = _snapshot(copy_of)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(tiny_whisper(4, -1, True, seed=9), copy_of, processor=_FailingProcessor())
    assert _snapshot(copy_of) == before
    assert os.listdir(copy_of.parent) == ["copy"]  # no temporary directory left behind
    assert_same_state(saved[0], load_quantized(copy_of))


def test_failed_swap_restores_previous_checkpoint(copy_of, monkeypatch):
    before = _snapshot(copy_of)
    real_rename = os.rename

    def rename(src, dst):  # the second rename (new checkpoint into place) fails
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_quantized(tiny_whisper(4, -1, True, seed=9), copy_of)
    assert _snapshot(copy_of) == before
    assert os.listdir(copy_of.parent) == ["copy"]


def test_save_replaces_existing_checkpoint(copy_of):
    new = tiny_whisper(4, -1, True, seed=9)
    save_quantized(new, copy_of)
    assert_same_state(new, load_quantized(copy_of))
    assert os.listdir(copy_of.parent) == ["copy"]
