"""transformers integration: AutoModel*.from_pretrained of save_quantized checkpoints.

Registration is process-global, so every test here runs with quant_method "fade" registered
(importing fade_kernels.io.hf_quantizer registers it); the unregistered behaviour (random
nn.Linear, a warning) is not tested.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    MoonshineConfig,
    MoonshineForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as hf_auto

from fade_kernels.config import QuantConfig
from fade_kernels.io import CheckpointError, load_quantized, quantized_modules, save_quantized
from fade_kernels.io.integrity import CHECKSUMS_NAME, IntegrityError
from fade_kernels.io.hf_quantizer import FadeHfQuantizer, FadeQuantConfig, is_registered, register_with_transformers
from fade_kernels.models.adapters import get_adapter
from fade_kernels.nn import QuantLinear, replace_linears

WHISPER = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, max_source_positions=1500,
               num_mel_bins=80, decoder_start_token_id=1, eos_token_id=2, pad_token_id=2)
MOONSHINE = dict(hidden_size=64, intermediate_size=128, encoder_num_hidden_layers=2, decoder_num_hidden_layers=2,
                 encoder_num_attention_heads=4, decoder_num_attention_heads=4, vocab_size=128,
                 decoder_start_token_id=1, eos_token_id=2, pad_token_id=2, bos_token_id=1)
DECODER_IDS = torch.tensor([[1, 5, 6, 7]])
BUFFER_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
                 "bias": torch.float32}


def quantized_model(family: str, bits: int, sym: bool = False) -> nn.Module:
    torch.manual_seed(bits)
    if family == "whisper":
        model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    else:
        model = MoonshineForConditionalGeneration(MoonshineConfig(**MOONSHINE))
    names = get_adapter(model).quantizable_names(model)
    replace_linears(model, names, lambda name, linear: QuantLinear.from_linear(linear, bits, group_size=32, sym=sym))
    return model.eval()


def encoder_inputs(family: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    if family == "whisper":  # Whisper's encoder takes exactly 2 * max_source_positions mel frames
        return {"input_features": torch.randn(1, 80, 2 * WHISPER["max_source_positions"], generator=gen)}
    return {"input_values": torch.randn(1, 4000, generator=gen)}


def logits(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**encoder_inputs(family), decoder_input_ids=DECODER_IDS).logits


CASES = [("whisper", 3, False), ("whisper", 4, False), ("moonshine", 3, True)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: intra-op threads only add spin-waiting on a shared 2-core machine
    # (10x slower under load). Restored for the rest of the test run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, bits): (in-memory quantized model, checkpoint dir)}, written once for the module."""
    out = {}
    for family, bits, sym in CASES:
        model = quantized_model(family, bits, sym)
        path = tmp_path_factory.mktemp(f"{family}-w{bits}") / "ckpt"
        save_quantized(model, path, quant_config=QuantConfig(method="rtn", bits=bits, group_size=32, sym=sym))
        out[family, bits] = (model, path)
    return out


@pytest.mark.parametrize("family,bits", [(f, b) for f, b, _ in CASES])
def test_from_pretrained_loads_the_quantized_layers(checkpoints, family, bits):
    original, path = checkpoints[family, bits]
    model, info = AutoModelForSpeechSeq2Seq.from_pretrained(path, output_loading_info=True)
    assert isinstance(model, type(original))
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched

    names = get_adapter(model).quantizable_names(model)
    assert sorted(quantized_modules(model)) == sorted(names)
    for name in names:
        got, want = model.get_submodule(name), original.get_submodule(name)
        assert isinstance(got, QuantLinear)
        assert (got.bits, got.group_size, got.sym) == (want.bits, want.group_size, want.sym)
        assert (got.bias is None) == (want.bias is None), name
        for buf, dtype in BUFFER_DTYPES.items():
            if getattr(want, buf) is not None:
                assert getattr(got, buf).dtype == dtype, f"{name}.{buf}"
                assert torch.equal(getattr(got, buf), getattr(want, buf)), f"{name}.{buf}"
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert not model.training

    qc = model.config.quantization_config
    assert isinstance(qc, FadeQuantConfig) and isinstance(model.hf_quantizer, FadeHfQuantizer)
    assert qc.to_dict() == json.loads((path / "config.json").read_text())["quantization_config"]

    reference = load_quantized(path)
    assert torch.equal(logits(model, family), logits(reference, family))
    generated = model.generate(**encoder_inputs(family), max_new_tokens=2)
    assert generated.dtype == torch.long and generated.shape[0] == 1


def test_low_precision_dtype_leaves_quantized_buffers_alone(checkpoints):
    _, path = checkpoints["whisper", 4]
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=torch.bfloat16)
    for name, layer in quantized_modules(model).items():
        for buf, dtype in BUFFER_DTYPES.items():
            assert getattr(layer, buf) is None or getattr(layer, buf).dtype == dtype, f"{name}.{buf}"
    assert model.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    features = encoder_inputs("whisper")["input_features"].bfloat16()
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=DECODER_IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_base_model_class_strips_the_prefix(checkpoints):
    # AutoModel builds WhisperModel: "model.encoder.layers.0.fc1" becomes "encoder.layers.0.fc1".
    _, path = checkpoints["whisper", 3]
    base = AutoModel.from_pretrained(path)
    assert type(base).__name__ == "WhisperModel"
    assert isinstance(base.encoder.layers[0].fc1, QuantLinear) and isinstance(base.decoder.layers[1].fc2, QuantLinear)
    reference = load_quantized(path).model
    features = encoder_inputs("whisper")["input_features"]
    with torch.no_grad():
        assert torch.equal(base.encoder(features).last_hidden_state, reference.encoder(features).last_hidden_state)


def test_a_from_pretrained_model_saves_back_with_save_quantized(checkpoints, tmp_path):
    _, path = checkpoints["moonshine", 3]
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path)
    save_quantized(model, tmp_path / "again")
    assert torch.equal(logits(load_quantized(tmp_path / "again"), "moonshine"), logits(model, "moonshine"))


@pytest.mark.parametrize("damage", ["missing", "dtype", "tied", "unknown"])
def test_damaged_checkpoint_raises_before_loading(checkpoints, tmp_path, damage):
    _, path = checkpoints["whisper", 3]
    broken = shutil.copytree(path, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    if damage in ("tied", "unknown"):  # config.json lists a layer that cannot be a QuantLinear
        config = json.loads((broken / "config.json").read_text())
        name = "proj_out" if damage == "tied" else "model.encoder.layers.7.fc1"
        config["quantization_config"]["modules"][name] = {"bits": 3, "group_size": 32, "sym": False}
        (broken / "config.json").write_text(json.dumps(config))
        match = "'proj_out' shares its weight" if damage == "tied" else "'model.encoder.layers.7.fc1' does not exist"
    elif damage == "missing":
        del tensors["model.decoder.layers.1.fc2.qweight"]
        match = "'model.decoder.layers.1.fc2.qweight' is missing"
    else:
        tensors["model.encoder.layers.0.fc1.scales"] = tensors["model.encoder.layers.0.fc1.scales"].float()
        match = "'model.encoder.layers.0.fc1.scales' has dtype F32"
    if damage in ("missing", "dtype"):
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / CHECKSUMS_NAME).unlink()   # the structural checks themselves, not the digests
    with pytest.raises(CheckpointError, match=match):
        AutoModelForSpeechSeq2Seq.from_pretrained(broken)


def test_from_pretrained_verifies_the_digests(checkpoints, tmp_path):
    _, path = checkpoints["whisper", 3]
    broken = shutil.copytree(path, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10   # inside the last tensor's bytes: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        AutoModelForSpeechSeq2Seq.from_pretrained(broken)


def test_full_precision_checkpoint_is_not_quantized_on_load(tmp_path):
    WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).save_pretrained(tmp_path)
    config = FadeQuantConfig(modules={"model.encoder.layers.0.fc1": {"bits": 4, "group_size": 32, "sym": False}})
    with pytest.raises(ValueError, match="cannot quantize"):
        AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path, quantization_config=config)


def test_config_validates_like_load_quantized():
    spec = {"bits": 3, "group_size": 32, "sym": False}
    config = FadeQuantConfig.from_dict({"quant_method": "fade", "modules": {"a.fc1": spec}, "damp": 0.01})
    assert (config.bits, config.group_size, config.sym, config.damp) == (3, 32, False, 0.01)
    with pytest.raises(ValueError, match="bits=5"):
        FadeQuantConfig(modules={"a.fc1": {**spec, "bits": 5}})
    with pytest.raises(ValueError, match="modules must be a non-empty"):
        FadeQuantConfig(modules={})
    with pytest.raises(ValueError, match="newer than this fade-kernels"):
        FadeQuantConfig(modules={"a.fc1": spec}, format_version=99)
    with pytest.raises(ValueError, match="clashes"):
        FadeQuantConfig(modules={"a.fc1": spec}, to_dict=1)


def test_registration_is_idempotent_and_refuses_a_foreign_fade():
    register_with_transformers()
    register_with_transformers()
    assert is_registered()
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fade"] is FadeQuantConfig
    assert hf_auto.AUTO_QUANTIZER_MAPPING["fade"] is FadeHfQuantizer

    class OtherQuantizer(HfQuantizer):
        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    hf_auto.AUTO_QUANTIZER_MAPPING["fade"] = OtherQuantizer
    try:
        assert not is_registered()
        with pytest.raises(RuntimeError, match="already maps quant_method 'fade'"):
            register_with_transformers()
    finally:
        hf_auto.AUTO_QUANTIZER_MAPPING["fade"] = FadeHfQuantizer
    assert is_registered()
