"""export_checkpoint / save_quantized(format=...) / `fade export`: destinations, refusals, GPTQ for vLLM."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration

from fade_kernels.cli import main
from fade_kernels.io import load_quantized, save_quantized
from fade_kernels.io.export import EXPORT_MARKER, ExportRefused, export_checkpoint
from fade_kernels.nn import QuantLinear, replace_linears

from test_gptq_format import WHISPER, logits

ONE_BLOCK = {**WHISPER, "encoder_layers": 1, "decoder_layers": 1}


def quantized_whisper(bits: int = 4, group_size: int = 32, sym: bool = False, bits_of=None, dense=()) -> nn.Module:
    """A one-block Whisper with every block linear packed, except the names in `dense`."""
    model = WhisperForConditionalGeneration(WhisperConfig(**ONE_BLOCK))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n and n not in dense]
    replace_linears(model, names, lambda name, linear: QuantLinear.from_linear(
        linear, (bits_of or {}).get(name, bits), group_size, sym))
    return model.eval()


def quiet_export(model, out, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_checkpoint(model, out, fmt)


def act_order(model: nn.Module) -> nn.Module:
    layer = model.get_submodule("model.encoder.layers.0.fc1")
    layer.g_idx.copy_(layer.g_idx.flip(0))
    return model


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the layer and the reason, nothing written


@pytest.mark.parametrize("fmt,make,match", [
    ("compressed-tensors", lambda: act_order(quantized_whisper()),
     r"model\.encoder\.layers\.0\.fc1: a layer uses GPTQ act-order with a permuted g_idx"),
    ("compressed-tensors", lambda: quantized_whisper(bits_of={"model.decoder.layers.0.fc2": 8}),
     r"model\.decoder\.layers\.0\.fc2 and .* use different grids \(num_bits 8 vs 4\)"),
    ("gptq", lambda: quantized_whisper(sym=False), r"k_proj is asymmetric: vLLM loads only symmetric GPTQ"),
    ("gptq", lambda: quantized_whisper(bits=3, sym=True), r"is 3-bit: vLLM's GPTQ loader takes only 4- and 8-bit"),
    ("gptq", lambda: quantized_whisper(sym=True, bits_of={"model.decoder.layers.0.fc2": 8}),
     "2 different grids"),
    ("compressed-tensors", lambda: quantized_whisper(dense=("model.encoder.layers.0.self_attn.k_proj",)),
     r"model\.encoder\.layers\.0\.self_attn: k_proj in full precision but q_proj/v_proj quantized; vLLM fuses"),
    ("gptq", lambda: quantized_whisper(sym=True, dense=("model.decoder.layers.0.encoder_attn.v_proj",)),
     r"model\.decoder\.layers\.0\.encoder_attn: v_proj in full precision but k_proj quantized"),
    ("gptq", lambda: quantized_whisper(sym=True, dense=("model.decoder.layers.0.fc2",)),
     r"model\.decoder\.layers\.0\.fc2 is in full precision but fc2 is quantized in other blocks"),
])
def test_export_refuses_what_its_target_cannot_load(tmp_path, fmt, make, match):
    with pytest.raises(ExportRefused, match=match) as info:
        export_checkpoint(make(), tmp_path / "out", fmt)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []   # no temporary left either


@pytest.mark.parametrize("fmt,sym", [("compressed-tensors", False), ("gptq", True)])
def test_whole_fused_groups_kept_in_full_precision_export(tmp_path, fmt, sym):
    dense = ("model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.0.encoder_attn.v_proj")
    if fmt == "compressed-tensors":
        dense += ("model.encoder.layers.0.fc2",)
    model = quantized_whisper(sym=sym, dense=dense)
    back = load_quantized(quiet_export(model, tmp_path / "out", fmt))
    assert all(not isinstance(back.get_submodule(name), QuantLinear) for name in dense)
    assert torch.equal(logits(model), logits(back))


def test_symmetric_layer_with_a_moved_zero_point_is_refused(tmp_path):
    model = quantized_whisper(sym=True)
    layer = model.get_submodule("model.decoder.layers.0.fc1")
    layer.sym = True
    layer.qzeros.zero_()                                      # zero points 0, not 2^(bits-1)
    with pytest.raises(ExportRefused, match=r"fc1: a symmetric layer has zero points other than 2\^\(bits-1\) = 8"):
        export_checkpoint(model, tmp_path / "out", "compressed-tensors")


def test_a_folder_that_is_not_an_earlier_export_is_never_replaced(tmp_path):
    model = quantized_whisper()
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(ExportRefused, match="is not empty and is not an export written by fade-kernels"):
        export_checkpoint(model, users, "compressed-tensors")
    assert (users / "notes.txt").read_text() == "keep me"
    # The quantized checkpoint itself is not an export either.
    save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(ExportRefused, match="not an export"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt", "compressed-tensors")
    # An earlier export is replaced; an empty folder is used.
    (tmp_path / "empty").mkdir()
    for out in (quiet_export(model, tmp_path / "again", "compressed-tensors"), tmp_path / "empty"):
        quiet_export(model, out, "compressed-tensors")
        assert json.loads((out / EXPORT_MARKER).read_text())["format"] == "compressed-tensors"


def test_unsupported_format_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="format must be one of compressed-tensors, gptq, got 'awq'"):
        save_quantized(quantized_whisper(), tmp_path / "out", format="awq")


def test_three_bit_compressed_tensors_export_warns_that_vllm_refuses_it(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_checkpoint(quantized_whisper(bits=3), tmp_path / "out", "compressed-tensors")
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("3-bit layers are written in compressed-tensors' current layout, but vLLM's WNA16 "
                            "kernels only take 4 and 8 bits") for m in messages), messages
    assert any(m.startswith("no processor was given") for m in messages), messages


# ----------------------------------------------------------------------------------------------
# GPTQ as vLLM loads it


def test_gptq_export_lists_the_quantized_modules_and_zero_k_proj_biases(tmp_path):
    model = quantized_whisper(bits=4, sym=True)
    path = quiet_export(model, tmp_path / "gptq", "gptq")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["sym"] is True
    assert qc["modules_in_block_to_quantize"] == [sorted([
        "encoder_attn.k_proj", "encoder_attn.out_proj", "encoder_attn.q_proj", "encoder_attn.v_proj", "fc1", "fc2",
        "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj"])]
    tensors = load_file(path / "model.safetensors")
    k_biases = [k for k in tensors if k.endswith("k_proj.bias")]
    assert len(k_biases) == 3 and all(not bool(tensors[k].any()) for k in k_biases)
    # Our importer drops the zero biases again: the round trip is bit-exact.
    back = load_quantized(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert model.state_dict().keys() == back.state_dict().keys()
    assert torch.equal(logits(model), logits(back))


# ----------------------------------------------------------------------------------------------
# Layers a method rescaled in full precision are written as they are


def test_awq_folded_layernorms_are_written_as_folded_dense_weights(tmp_path):
    from fade_kernels import QuantConfig, quantize_model
    from fade_kernels.calib.samples import CalibSample

    model = WhisperForConditionalGeneration(WhisperConfig(**{**ONE_BLOCK, "max_source_positions": 1500})).eval()
    norms = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    samples = []
    for i in range(4):
        features = torch.full((80, 3000), -0.8)
        features[:, : 100 * (1 + i)] = torch.randn(80, 100 * (1 + i))
        samples.append(CalibSample(features, 16000 * (1 + i), torch.randint(3, 100, (5 + i,))))
    quantize_model(model, samples, QuantConfig(method="awq", bits=4, group_size=32), batch_size=2, progress=False)
    folded = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and not torch.equal(m.weight, norms[n])]
    assert folded, "AWQ folded no LayerNorm: the test would check nothing"
    path = quiet_export(model, tmp_path / "ct", "compressed-tensors")
    tensors = load_file(path / "model.safetensors")
    for name in folded:
        assert torch.equal(tensors[f"{name}.weight"], model.get_submodule(name).weight), name
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_features=features, decoder_input_ids=torch.tensor([[3, 4]])).logits
        back = load_quantized(path)(input_features=features, decoder_input_ids=torch.tensor([[3, 4]])).logits
    assert torch.equal(ours, back)


@pytest.mark.parametrize("fmt,sym", [("compressed-tensors", False), ("gptq", True)])
@pytest.mark.parametrize("head", ["bf16", "bits8", "bits4"])
def test_compact_head_is_written_as_the_tied_float32_embedding(tmp_path, head, fmt, sym):
    from fade_kernels.nn.head import apply_head_format, dense_head, dense_head_weight, head_format

    model = quantized_whisper(sym=sym)
    apply_head_format(model, head, group_size=32)
    weight = dense_head_weight(model)
    with dense_head(model):
        reference = logits(model)                     # the same model with a plain float32 head
    path = quiet_export(model, tmp_path / "out", fmt)
    assert head_format(model) == head and model.config.tie_word_embeddings is False   # restored after the write
    tensors = load_file(path / "model.safetensors")
    assert not [k for k in tensors if k.startswith("proj_out")]
    embedding = tensors["model.decoder.embed_tokens.weight"]
    assert embedding.dtype == torch.float32 and torch.equal(embedding, weight)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "proj_out" not in json.dumps(config["quantization_config"].get("modules_in_block_to_quantize", []))
    back = load_quantized(path)
    assert torch.equal(back.get_output_embeddings().weight, weight)
    assert torch.equal(logits(back), reference)


# ----------------------------------------------------------------------------------------------
# The CLI


def test_cli_export_writes_both_formats_and_the_processor(tmp_path, capsys):
    from transformers import WhisperFeatureExtractor

    model = quantized_whisper(sym=True)
    save_quantized(model, tmp_path / "ckpt", processor=WhisperFeatureExtractor(feature_size=80))
    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        assert main(["export", str(tmp_path / "ckpt"), "--format", fmt, "--out", str(out)]) == 0
        assert (out / EXPORT_MARKER).is_file()
        assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()
        assert torch.equal(logits(load_quantized(out)), logits(model))
    assert "exported" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--format", "gptq"], "k_proj is asymmetric: vLLM loads only symmetric GPTQ checkpoints"),
    (["--format", "compressed-tensors", "--out-is-source"], "is not empty and is not an export"),
])
def test_cli_export_refusals_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    save_quantized(quantized_whisper(sym=False), tmp_path / "ckpt")
    out = tmp_path / "ckpt" if "--out-is-source" in argv else tmp_path / "out"
    argv = [a for a in argv if a != "--out-is-source"]
    capsys.readouterr()                                   # drop the setup's progress bar
    assert main(["export", str(tmp_path / "ckpt"), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fade export: error: ") and message in err[0]


def test_cli_export_of_a_missing_folder_names_it(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "gptq", "--out", str(tmp_path / "o")]) == 2
    assert "QUANTIZED_DIR not found" in capsys.readouterr().err
