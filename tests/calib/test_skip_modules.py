"""QuantConfig.skip_modules: named layers stay nn.Linear in full precision, through save and load."""
import copy

import pytest
import torch

from fade_kernels import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from fade_kernels.cli import main
from fade_kernels.models.adapters import get_adapter

from test_pipeline import whisper_samples

SKIP = ("*.fc2", "model.encoder.layers.0.self_attn.v_proj")


def test_config_matches_full_names_with_globs():
    config = QuantConfig(skip_modules=[" *.fc2", "model.encoder.layers.0.*"])
    assert config.skip_modules == ("*.fc2", "model.encoder.layers.0.*")
    assert config.skips("model.decoder.layers.1.fc2") and config.skips("model.encoder.layers.0.self_attn.q_proj")
    assert not config.skips("model.encoder.layers.1.fc1") and not QuantConfig().skips("model.decoder.layers.1.fc2")
    assert config.to_dict()["skip_modules"] == ["*.fc2", "model.encoder.layers.0.*"]
    for bad in ("fc2", ["fc2", ""], [3]):
        with pytest.raises(ValueError, match="skip_modules must be a sequence of non-empty module-name patterns"):
            QuantConfig(skip_modules=bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_skipped_layers_stay_full_precision_through_save_and_load(method, tiny_whisper, tmp_path):
    model = tiny_whisper
    original = copy.deepcopy(model)
    targets = get_adapter(model).quantizable_names(model)
    config = QuantConfig(method=method, bits=4, group_size=32, skip_modules=SKIP)
    skipped = [name for name in targets if config.skips(name)]
    assert len(skipped) == 5   # fc2 of 2 + 2 blocks, and one v_proj

    report = quantize_model(model, whisper_samples(), config, batch_size=4, progress=False)
    modules, before = dict(model.named_modules()), dict(original.named_modules())
    assert [layer.name for layer in report.layers] == [name for name in targets if name not in skipped]
    for name in targets:
        if name in skipped:
            assert type(modules[name]) is torch.nn.Linear
            assert torch.equal(modules[name].weight, before[name].weight)
        else:
            assert isinstance(modules[name], QuantLinear), name
    if method == "awq":
        # q/k/v of encoder block 0 read one LayerNorm; with v_proj in full precision AWQ may not
        # rescale it (v_proj would see x / s), so that norm is untouched. out_proj's scale cannot
        # go into an unquantized v_proj either.
        norm = "model.encoder.layers.0.self_attn_layer_norm"
        assert torch.equal(modules[norm].weight, before[norm].weight)
    assert model.config.quantization_config["skip_modules"] == list(SKIP)
    assert not set(skipped) & set(model.config.quantization_config["modules"])

    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.config.quantization_config["skip_modules"] == list(SKIP)
    reloaded = dict(loaded.named_modules())
    for name in skipped:
        assert type(reloaded[name]) is torch.nn.Linear and torch.equal(reloaded[name].weight, before[name].weight)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    sample = whisper_samples(1)[0]
    ids = sample.decoder_ids[None]
    with torch.no_grad():
        expected = model(input_features=sample.encoder_input[None], decoder_input_ids=ids).logits
        got = loaded(input_features=sample.encoder_input[None], decoder_input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_pattern_that_matches_nothing_is_an_error(tiny_whisper, monkeypatch, capsys, tmp_path):
    config = QuantConfig(method="rtn", bits=4, group_size=32, skip_modules=("*.fc2", "*.fc3"))
    with pytest.raises(ValueError, match=r"skip_modules patterns \['\*\.fc3'\] match no quantizable layer"):
        quantize_model(tiny_whisper, whisper_samples(2), config, progress=False)

    import fade_kernels.cli as cli

    monkeypatch.setattr(cli, "load_cli_model", lambda spec: (tiny_whisper, None))
    code = main(["quantize", "--model", "m", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--skip-modules", "*.fc2, nothing.here", "--out", str(tmp_path / "out"), "--quiet", "--no-resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "--skip-modules" in err and "['nothing.here'] match no quantizable layer" in err
    assert not (tmp_path / "out").exists()
