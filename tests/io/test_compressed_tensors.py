"""compressed-tensors pack-quantized export/import, checked against the compressed-tensors library.

The library (pinned in .ci/requirements.txt) is the reference: its pack_to_int32 /
unpack_from_int32 for the bit layout, its PackedQuantizationCompressor (through transformers'
compressed-tensors loader) for decompression, and its compress path for a checkpoint "made
elsewhere".
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSpeechSeq2Seq, WhisperConfig, WhisperForConditionalGeneration
from transformers.utils.quantization_config import CompressedTensorsConfig

from fade_kernels.io import CheckpointError, load_quantized, quantized_modules, save_quantized
from fade_kernels.io.compressed_tensors import (
    import_compressed_tensors,
    pack_stream,
    unpack_legacy_stream,
    unpack_stream,
)
from fade_kernels.nn import QuantLinear, replace_linears

from test_gptq_format import WHISPER, block_linears, logits  # d_model 64, ffn 128: fits 3-bit runs, groups 32/64


@pytest.fixture(autouse=True)
def fp32_activations(monkeypatch):
    """Compare with dense models under the fp32-activation CPU kernel: the int8-activation kernel
    (the default for M <= 8 on VNNI CPUs) adds its own bounded rounding, tested in tests/ops."""
    from fade_kernels.ops import cpu

    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")


def quantized_whisper(bits: int, group_size: int, sym: bool) -> nn.Module:
    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    replace_linears(model, block_linears(model), lambda name, linear: QuantLinear.from_linear(linear, bits,
                                                                                            group_size, sym))
    return model.eval()


def export(model: nn.Module, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no processor" / "vLLM takes 4 and 8 bits": tested in test_export
        return save_quantized(model, out, format="compressed-tensors")


def library_dense(path: Path) -> nn.Module:
    """The checkpoint decompressed by compressed-tensors, as transformers users load it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForSpeechSeq2Seq.from_pretrained(
            str(path), quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()


# ----------------------------------------------------------------------------------------------
# The bit layout against the library's packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("length", [32, 64, 40, 72])
def test_pack_stream_equals_the_library(bits, dim, length):
    shape = (length, 5) if dim == 0 else (5, length)
    signed = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), shape, dtype=torch.int8)
    ours = pack_stream(signed.to(torch.int32) + 2 ** (bits - 1), bits, dim=dim)
    library = pack_to_int32(signed, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, library)
    fields = unpack_stream(library, bits, length, dim=dim)
    assert torch.equal(fields, unpack_from_int32(library, bits, torch.Size(shape), packed_dim=dim).to(torch.int32)
                       + 2 ** (bits - 1))


def test_legacy_three_bit_layout_is_ten_fields_per_word():
    # compressed-tensors <= 0.17: field i of a word at bits [3i, 3i + 3), bits 30-31 unused.
    fields = torch.randint(0, 8, (4, 25), dtype=torch.int32)
    words = torch.zeros(4, 3, dtype=torch.int64)
    for i in range(25):
        words[:, i // 10] |= fields[:, i].long() << (3 * (i % 10))
    assert torch.equal(unpack_legacy_stream(words.to(torch.int32), 3, 25, dim=1), fields)
    assert torch.equal(unpack_legacy_stream(words.t().contiguous().to(torch.int32), 3, 25, dim=0), fields.t())


# ----------------------------------------------------------------------------------------------
# Export: the library decompresses our weights bit for bit; our import gives the model back


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (4, 64, True), (4, -1, False), (8, 32, False),
                                                 (8, -1, True), (3, 32, False), (2, 64, True)])
def test_library_decompression_equals_our_dequantized_weights(tmp_path, bits, group_size, sym):
    model = quantized_whisper(bits, group_size, sym)
    dense = library_dense(export(model, tmp_path / "ct"))
    for name, layer in quantized_modules(model).items():
        weight = dense.get_submodule(name).weight
        assert weight.dtype == torch.float32 and torch.equal(weight, layer.dequantize()), name
    # Different GEMMs (dense vs our kernels) on the same weights: float32 rounding only.
    ours, theirs = logits(model), logits(dense)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), float((ours - theirs).abs().max())


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, 64, True), (3, -1, False)])
def test_export_import_round_trip_is_bit_exact(tmp_path, bits, group_size, sym):
    model = quantized_whisper(bits, group_size, sym)
    back = load_quantized(export(model, tmp_path / "ct"))
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert torch.equal(logits(model), logits(back))


def test_exported_config_and_tensors_follow_the_format(tmp_path):
    model = quantized_whisper(4, 32, False)
    path = export(model, tmp_path / "ct")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["proj_out"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "dynamic": False}
    tensors = load_file(path / "model.safetensors")
    name = "model.encoder.layers.0.fc1"
    layer = model.get_submodule(name)
    assert torch.equal(tensors[f"{name}.weight_packed"], layer.qweight.t())           # (N, K/8)
    assert torch.equal(tensors[f"{name}.weight_zero_point"], layer.qzeros.t())        # (N/8, G)
    assert torch.equal(tensors[f"{name}.weight_scale"], layer.scales.t().float())
    assert tensors[f"{name}.weight_shape"].tolist() == [128, 64]
    assert not any(key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for key in tensors)


def test_three_bit_in_the_older_layout_imports_to_the_same_model(tmp_path):
    model = quantized_whisper(3, 32, False)
    path = export(model, tmp_path / "ct")
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if k.endswith((".weight_packed", ".weight_zero_point"))]:
        dim = 1 if key.endswith("weight_packed") else 0
        words = tensors[key]
        count = int(tensors[key.rsplit(".", 1)[0] + ".weight_shape"][1 if dim == 1 else 0])
        fields = unpack_stream(words, 3, count, dim=dim).movedim(dim, 1).long()
        legacy = torch.zeros(fields.shape[0], -(-count // 10), dtype=torch.int64)
        for i in range(count):
            legacy[:, i // 10] |= fields[:, i] << (3 * (i % 10))
        tensors[key] = legacy.to(torch.int32).movedim(1, dim).contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits(load_quantized(path)), logits(model))


# ----------------------------------------------------------------------------------------------
# Import of a checkpoint written by the library's own compressor (as llm-compressor does)


def write_library_checkpoint(out: Path, bits: int, group_size: int, sym: bool) -> nn.Module:
    """A dense random Whisper, quantized and packed by compressed-tensors (min-max scales in
    float32, its quantize/pack_to_int32), saved with its QuantizationConfig. Returns the model
    with the library's fake-quantized weights (the dense decompression)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = model.state_dict()
    qmax, qmin = 2 ** (bits - 1) - 1, -2 ** (bits - 1)
    for name in block_linears(model):
        weight = state.pop(f"{name}.weight")
        groups = weight.reshape(weight.shape[0], -1, group_size)
        if sym:
            scale = groups.abs().amax(-1) / qmax
            zero = torch.zeros_like(scale, dtype=torch.int8)
        else:
            low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
            scale = (high - low) / (qmax - qmin)
            zero = torch.round(qmin - low / scale).clamp(qmin, qmax).to(torch.int8)
        local = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}
        q = quantize(weight, scale, zero, args, dtype=torch.int8)
        dense = dequantize(q, scale, zero, args)
        model.get_submodule(name).weight.data.copy_(dense)
        compressed = PackedQuantizationCompressor.compress(local, scheme)
        state.update({f"{name}.{k}": v for k, v in compressed.items()})
    state.pop("proj_out.weight")  # tied to the decoder embedding
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {**model.config.to_dict(), "architectures": ["WhisperForConditionalGeneration"]}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": "0.20.1", "sparsity_config": {}, "transform_config": {},
        **QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=["proj_out"],
                             quantization_status="compressed").model_dump(exclude=["quant_method"])}
    (out / "config.json").write_text(json.dumps(config, default=str))
    return model


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 64, False), (8, 32, False)])
def test_checkpoint_written_by_the_library_runs_packed_on_our_kernels(tmp_path, bits, group_size, sym):
    dense = write_library_checkpoint(tmp_path / "ct", bits, group_size, sym)
    with pytest.warns(UserWarning, match="rounded to float16"):
        model = import_compressed_tensors(tmp_path / "ct")
    for name, layer in quantized_modules(model).items():
        weight = dense.get_submodule(name).weight
        # Same codes and zero points; only the float32 -> float16 scale rounding differs
        # (relative 2^-11 of each weight at most).
        assert torch.allclose(layer.dequantize(), weight, rtol=2 ** -11, atol=0), name
        assert layer.bits == bits and layer.sym == sym and layer.group_size == group_size
    assert set(quantized_modules(model)) == set(block_linears(dense))
    assert torch.allclose(logits(model), logits(dense), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.update(format="int-quantized"), r"format \['int-quantized'\] is not supported"),
    (lambda qc: qc.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "quantizes input_activations.*only weight-only"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "strategy='tensor'"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=5), "num_bits=5"),
    (lambda qc: qc.update(ignore=["model.encoder.layers.0.fc1"]), "ignore lists it"),
])
def test_import_refuses_what_it_cannot_run(tmp_path, edit, match):
    path = export(quantized_whisper(4, 32, False), tmp_path / "ct")
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_quantized(path)
