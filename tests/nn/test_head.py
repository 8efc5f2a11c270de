"""Head formats: the tied output projection / token embedding in bf16, 8 or 4 bits, stored once,
loaded back bit-identical; the other float tensors stored as float16 only when that is exact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_whisper_config
from fade_kernels.io import load_quantized, save_quantized
from fade_kernels.models.adapters import get_adapter
from fade_kernels.nn import QuantLinear, replace_linears
from fade_kernels.nn.head import (LowPrecisionEmbedding, LowPrecisionLinear, PackedEmbedding, apply_head_format,
                                  head_format)


def _quantized_whisper(head: str, round_to_fp16: bool = False):
    """A random 4-bit Whisper (vocab 128, d_model 64) with its head in format `head`."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(tiny_whisper_config(max_source_positions=50)).eval()
    if round_to_fp16:                 # like a checkpoint distributed in float16
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    names = get_adapter(model).quantizable_names(model)
    replace_linears(model, names, lambda name, linear: QuantLinear.from_linear(linear, bits=4, group_size=32))
    apply_head_format(model, head, group_size=32)
    return model


def _logits(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 80, 100, generator=generator)
    ids = torch.tensor([[1, 7, 8, 9], [1, 30, 4, 6]])
    with torch.inference_mode():
        return model(input_features=features, decoder_input_ids=ids).logits


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_embedding_rows_are_the_dequantized_projection(bits, monkeypatch):
    from fade_kernels.ops import cpu

    # The float64 comparison below holds for the fp32-activation kernel; the int8-activation one
    # (the default for M <= 8 on VNNI CPUs) has its own rounding bound, tested in tests/ops.
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")
    model = _quantized_whisper(f"bits{bits}")
    head, embedding = model.proj_out, model.model.decoder.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(embedding, PackedEmbedding) and embedding.head is head
    ids = torch.randint(0, head.out_features, (3, 5))
    rows = embedding(ids)
    assert rows.shape == (3, 5, head.in_features) and rows.dtype == torch.float32
    assert torch.equal(rows, head.dequantize()[ids])
    # The embedding's rows are what the projection multiplies by: x @ rows^T == proj_out(x) rows.
    x = torch.randn(2, head.in_features, dtype=torch.float64)
    expected = x @ head.dequantize().double().t()
    got = head(x.float()).double()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bf16_head_matmul_and_rows():
    model = _quantized_whisper("bf16")
    head, embedding = model.proj_out, model.model.decoder.embed_tokens
    assert isinstance(head, LowPrecisionLinear) and isinstance(embedding, LowPrecisionEmbedding)
    assert head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, head.out_features, (4,))
    assert torch.equal(embedding(ids), head.weight.float()[ids])
    x = torch.randn(3, head.in_features)
    expected = x.double() @ head.weight.double().t()
    got = head(x)
    assert got.dtype == torch.float32
    # x is rounded to bfloat16 (8 significant bits) before the product: error ~ 2^-8 per term.
    bound = 2 * 2 ** -8 * (x.double().abs() @ head.weight.double().abs().t()) + 1e-6
    assert ((got.double() - expected).abs() <= bound).all()


def test_fp32_leaves_the_tie_alone():
    model = _quantized_whisper("fp32")
    assert head_format(model) == "fp32"
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("head", ["bits4", "bits8", "bf16", "fp32"])
def test_head_round_trip_is_exact_and_stored_once(tmp_path, head):
    model = _quantized_whisper(head)
    save_quantized(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["head"] == head
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as reader:
        names = set(reader.keys())
    head_names = {n for n in names if n.startswith("proj_out.") or ".embed_tokens." in n}
    expected = {"bits4": {f"proj_out.{b}" for b in ("qweight", "qzeros", "scales", "g_idx")},
                "bits8": {f"proj_out.{b}" for b in ("qweight", "qzeros", "scales", "g_idx")},
                "bf16": {"proj_out.weight"}, "fp32": {"model.decoder.embed_tokens.weight"}}[head]
    assert head_names == expected
    loaded = load_quantized(tmp_path / "ckpt")
    assert head_format(loaded) == head
    if head != "fp32":
        assert loaded.model.decoder.embed_tokens.head is loaded.proj_out
    assert torch.equal(_logits(model), _logits(loaded))
    if head != "fp32":                      # loaded in bfloat16: the embedding follows the model's dtype
        half = load_quantized(tmp_path / "ckpt", dtype=torch.bfloat16)
        assert half.model.decoder.embed_tokens(torch.tensor([[1, 2]])).dtype == torch.bfloat16
        assert head != "bf16" or half.proj_out.weight.dtype == torch.bfloat16


def test_float16_storage_only_when_exact(tmp_path):
    exact = _quantized_whisper("bits4", round_to_fp16=True)
    inexact = _quantized_whisper("bits4")
    for name, model in (("exact", exact), ("inexact", inexact)):
        save_quantized(model, tmp_path / name)
    with safe_open(str(tmp_path / "exact" / "model.safetensors"), "pt") as reader:
        conv = reader.get_slice("model.encoder.conv1.weight").get_dtype()
        norm = reader.get_slice("model.decoder.layer_norm.weight").get_dtype()
        bias = reader.get_slice("model.decoder.layers.0.fc1.bias").get_dtype()
    assert (conv, norm, bias) == ("F16", "F16", "F32")      # QuantLinear's bias keeps its float32 layout
    with safe_open(str(tmp_path / "inexact" / "model.safetensors"), "pt") as reader:
        assert reader.get_slice("model.encoder.conv1.weight").get_dtype() == "F32"
    for name, model in (("exact", exact), ("inexact", inexact)):
        loaded = load_quantized(tmp_path / name)
        assert loaded.model.encoder.conv1.weight.dtype == torch.float32
        assert torch.equal(_logits(model), _logits(loaded))


def test_unknown_or_untied_head_is_refused():
    model = _quantized_whisper("fp32")
    with pytest.raises(ValueError, match="head format must be one of"):
        apply_head_format(model, "bits5")
    model.proj_out.weight = torch.nn.Parameter(model.proj_out.weight.detach().clone())
    with pytest.raises(ValueError, match="not tied"):
        apply_head_format(model, "bits4")
