"""GPTQ v1/v2 export and import: bit-exact round trips, raw zero-point layout, refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration

from fade_kernels.io import CheckpointError, export_gptq, import_gptq, load_quantized, quantized_modules, save_quantized
from fade_kernels.io.gptq_format import zeros_from_gptq, zeros_to_gptq
from fade_kernels.nn import QuantLinear, replace_linears
from fade_kernels.packing import pack_codes, pack_qzeros, unpack_codes, unpack_qzeros

WHISPER = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=64,
               max_target_positions=32, num_mel_bins=80, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None)


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def tiny_whisper(bits: int, group_size: int, sym: bool, names_filter=None, **overrides) -> nn.Module:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**WHISPER, **overrides}))
    names = [n for n in block_linears(model) if names_filter is None or names_filter(n)]
    replace_linears(model, names, lambda name, linear: QuantLinear.from_linear(linear, bits, group_size, sym))
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    features = torch.randn(1, 80, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=torch.tensor([[3, 4, 5]])).logits


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def raw(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_quant_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def model3() -> nn.Module:
    return tiny_whisper(3, 32, False)


@pytest.fixture(scope="module")
def exported(model3, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptq")
    return {fmt: export_gptq(model3, root / fmt, zero_point_format=fmt) for fmt in ("v1", "v2")}


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", ["v1", "v2"])
@pytest.mark.parametrize("bits,group_size,sym", [(3, 32, False), (3, -1, True), (4, 32, True), (4, -1, False)])
def test_export_import_is_bit_exact(tmp_path, fmt, bits, group_size, sym):
    model = tiny_whisper(bits, group_size, sym)
    export_gptq(model, tmp_path / "g", zero_point_format=fmt)
    imported = import_gptq(tmp_path / "g")
    assert_same_state(model, imported)
    assert imported.proj_out.weight is imported.model.decoder.embed_tokens.weight
    assert {n: (m.bits, m.group_size, m.sym) for n, m in quantized_modules(imported).items()} == \
           {n: (m.bits, m.group_size, m.sym) for n, m in quantized_modules(model).items()}
    if (bits, group_size, sym, fmt) == (3, 32, False, "v1"):  # one forward pass is enough
        assert torch.equal(logits(model), logits(imported))


def test_gptq_config(exported):
    for fmt, expected in (("v1", "gptq"), ("v2", "gptq_v2")):
        qc = json.loads((exported[fmt] / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "gptq"
        assert qc["checkpoint_format"] == qc["format"] == expected
        assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (3, 32, False, False)
        assert qc["pack_dtype"] == "int32" and qc["lm_head"] is False
        assert qc["dynamic"] == {"-:^proj_out$": {}}  # the one linear left in full precision
        assert qc["meta"]["fade_modules"]["model.encoder.layers.0.fc2"] == {"bits": 3, "group_size": 32, "sym": False}
        assert json.loads((exported[fmt] / "quantize_config.json").read_text()) == qc


def test_raw_tensors_follow_gptq_layout(model3, exported):
    """v2 stores our buffers; v1 stores (z - 1) mod 2^b in every field, read back bitwise."""
    v1, v2 = raw(exported["v1"]), raw(exported["v2"])
    mask = 2 ** 3 - 1
    for name, layer in quantized_modules(model3).items():
        for buf in ("qweight", "scales", "g_idx", "bias"):
            if getattr(layer, buf) is None:
                assert f"{name}.{buf}" not in v1
                continue
            assert torch.equal(v1[f"{name}.{buf}"], getattr(layer, buf)) and torch.equal(v2[f"{name}.{buf}"], getattr(layer, buf))
        assert torch.equal(v2[f"{name}.qzeros"], layer.qzeros)
        z = unpack_qzeros(layer.qzeros, 3, layer.out_features)                      # (N, G)
        stored = unpack_codes(v1[f"{name}.qzeros"], 3, dim=1)[:, : layer.out_features]  # (G, N)
        assert torch.equal(stored, ((z - 1) & mask).t())
        assert torch.equal(v1[f"{name}.qzeros"], pack_qzeros((z - 1) & mask, 3))
        assert v1[f"{name}.qzeros"].shape == (layer.in_features // 32, layer.out_features * 3 // 32)


def test_v1_wraps_zero_point_zero_inside_its_field(tmp_path):
    """z = 0 is stored as 2^b - 1 without borrowing from the neighbouring (straddling) field."""
    for bits in (3, 4):
        maxq = 2 ** bits - 1
        n, k = 64, 32
        zeros = torch.tensor([0, maxq, 1, 0] * (n // 4), dtype=torch.int32).reshape(n, 1)
        codes = torch.randint(0, maxq + 1, (n, k), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
        layer = QuantLinear.from_codes(codes, torch.rand(n, 1) + 0.1, zeros, bits, -1)
        stored = zeros_to_gptq(layer.qzeros, bits, n, "v1")
        fields = unpack_codes(stored, bits, dim=1)[0]
        assert torch.equal(fields, torch.tensor([maxq, maxq - 1, 0, maxq] * (n // 4), dtype=torch.int32))
        assert torch.equal(zeros_from_gptq(stored, bits, n, "v1"), layer.qzeros)
        assert torch.equal(zeros_from_gptq(layer.qzeros, bits, n, "v2"), layer.qzeros)


def test_export_warns_about_zero_point_zero_in_v1(tmp_path):
    model = tiny_whisper(4, 32, False)
    layer = model.model.encoder.layers[0].fc1
    z = unpack_qzeros(layer.qzeros, 4, layer.out_features)
    z[0, 0] = 0
    layer.qzeros.copy_(pack_qzeros(z, 4))
    with pytest.warns(UserWarning, match="zero points equal to 0"):
        export_gptq(model, tmp_path / "g", "v1")
    assert_same_state(model, import_gptq(tmp_path / "g"))


def test_width_not_multiple_of_32(tmp_path):
    """N = 80: qzeros are exported zero-padded to ceil(80/32)*3 = 9 words and read back exactly."""
    model = tiny_whisper(3, 32, False, names_filter=lambda n: n.endswith("fc1"), encoder_ffn_dim=80, decoder_ffn_dim=80)
    with pytest.warns(UserWarning, match="not a multiple of 32"):
        export_gptq(model, tmp_path / "g", "v1")
    assert raw(tmp_path / "g")["model.encoder.layers.0.fc1.qzeros"].shape == (2, 9)
    imported = import_gptq(tmp_path / "g")
    assert_same_state(model, imported)
    assert torch.equal(logits(model), logits(imported))


def test_import_accepts_tight_qzeros_width():
    """4-bit, N = 80: tools that pack exactly ceil(N*4/32) = 10 words are read like our 12."""
    n, groups, bits = 80, 2, 4
    z = torch.randint(0, 16, (n, groups), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    ours = pack_qzeros(z, bits)                                   # [2, 12]
    tight = pack_codes(((z - 1) & 15).t(), bits, dim=1)           # [2, 10], v1
    assert ours.shape == (2, 12) and tight.shape == (2, 10)
    assert torch.equal(zeros_from_gptq(tight, bits, n, "v1"), ours)
    with pytest.raises(ValueError, match=r"has 4 words per row; 3-bit zero points of N=64 outputs "
                                         r"need at least 6 words in whole 3-word runs"):
        zeros_from_gptq(torch.zeros(2, 4, dtype=torch.int32), 3, 64, "v2")
    with pytest.raises(ValueError, match=r"need at least 10 words \(export_gptq writes 12\)"):
        zeros_from_gptq(torch.zeros(2, 9, dtype=torch.int32), 4, 80, "v2")


def test_act_order_g_idx_round_trips(tmp_path):
    model = tiny_whisper(4, 32, False)
    layer = model.model.decoder.layers[1].fc2                     # K = 128, 4 groups
    layer.g_idx.copy_(layer.g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))])
    export_gptq(model, tmp_path / "g", "v2")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["desc_act"] is True
    assert_same_state(model, import_gptq(tmp_path / "g"))


def test_mixed_layers_without_fade_metadata_use_dynamic_rules(tmp_path):
    """A foreign-looking checkpoint: per-layer settings only in GPTQModel's `dynamic` map."""
    model = tiny_whisper(3, 32, False)
    fc2 = block_linears(WhisperForConditionalGeneration(WhisperConfig(**WHISPER)))[5]
    assert fc2 == "model.encoder.layers.0.fc2"
    replace_linears(model, [fc2], lambda n, _: QuantLinear.from_linear(nn.Linear(128, 64), 4, -1, True))
    export_gptq(model, tmp_path / "g", "v1")
    edit_quant_config(tmp_path / "g", lambda qc: qc.pop("meta"))
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"][f"+:^{fc2.replace('.', chr(92) + '.')}$"] == {"bits": 4, "group_size": -1, "sym": True}
    assert_same_state(model, import_gptq(tmp_path / "g"))


def test_import_casts_fp16_bias(exported, model3, tmp_path):
    path = tmp_path / "g"
    shutil.copytree(exported["v2"], path)
    tensors = load_file(path / "model.safetensors")
    key = "model.encoder.layers.0.fc1.bias"
    tensors[key] = tensors[key].half()                            # what AutoGPTQ writes
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    layer = import_gptq(path).model.encoder.layers[0].fc1
    assert layer.bias.dtype == torch.float32
    assert torch.equal(layer.bias, model3.model.encoder.layers[0].fc1.bias.half().float())


def test_export_from_saved_directory(model3, tmp_path):
    save_quantized(model3, tmp_path / "fade", quant_config={"method": "rtn"})
    export_gptq(tmp_path / "fade", tmp_path / "g", "v2")
    imported = import_gptq(tmp_path / "g")
    assert_same_state(model3, imported)
    assert imported.config.quantization_config["method"] == "rtn"
    save_quantized(imported, tmp_path / "back")                   # imported models save as fade
    assert_same_state(model3, load_quantized(tmp_path / "back"))


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def v1_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported["v1"], tmp_path / "v1"))


def _drop_format(qc: dict) -> None:
    qc.pop("checkpoint_format")
    qc.pop("format")


@pytest.mark.parametrize("edit,match", [
    (_drop_format, r"no checkpoint_format.*Accepted values: 'gptq' \(v1\), 'gptq_v2' \(v2\)"),
    (lambda qc: qc.update(checkpoint_format="marlin", format="marlin"),
     r"checkpoint_format 'marlin' is not supported; accepted values: 'gptq' \(v1\), 'gptq_v2' \(v2\)"),
    (lambda qc: qc.update(format="gptq_v2"), "disagree"),
    (lambda qc: qc.update(quant_method="awq"), "quant_method is 'awq', expected 'gptq'"),
    (lambda qc: qc["meta"]["fade_modules"]["model.encoder.layers.0.fc1"].update(bits=4),
     r"model.encoder.layers.0.fc1.qweight' has shape \(6, 128\), but config.json gives the layer bits=4, "
     r"group_size=32, which expects \(8, 128\)"),
])
def test_import_refuses_bad_config(v1_copy, edit, match):
    edit_quant_config(v1_copy, edit)
    with pytest.raises(CheckpointError, match=match):
        import_gptq(v1_copy)


def test_import_refuses_missing_quantization_config(v1_copy):
    (v1_copy / "quantize_config.json").unlink()
    config = json.loads((v1_copy / "config.json").read_text())
    config.pop("quantization_config")
    (v1_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        import_gptq(v1_copy)


def test_import_refuses_bad_qzeros_width(v1_copy):
    tensors = load_file(v1_copy / "model.safetensors")
    key = "model.encoder.layers.0.fc1.qzeros"
    tensors[key] = tensors[key][:, :4].contiguous()
    save_file(tensors, v1_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}: qzeros has 4 words per row"):
        import_gptq(v1_copy)


def test_formats_point_at_each_other(exported, model3, tmp_path):
    save_quantized(model3, tmp_path / "fade")
    with pytest.raises(CheckpointError, match="load_quantized"):
        import_gptq(tmp_path / "fade")
    # load_quantized reads GPTQ checkpoints through import_gptq.
    assert_same_state(load_quantized(exported["v2"]), import_gptq(exported["v2"]))


def test_export_rejects_unknown_zero_point_format(model3, tmp_path):
    with pytest.raises(ValueError, match=r"zero_point_format must be one of \['v1', 'v2'\]"):
        export_gptq(model3, tmp_path / "g", zero_point_format="v3")
    assert not (tmp_path / "g").exists()
