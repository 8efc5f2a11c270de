"""Mixed precision under a budget (pipeline/bit_allocation.py, QuantConfig.avg_bits)."""
import copy

import pytest
import torch

from fade_kernels import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from fade_kernels.cli import main
from fade_kernels.models.adapters import ENCODER_FRAMES, OWN_TOKENS, get_adapter
from fade_kernels.pipeline.bit_allocation import (GroupCandidate, allocate_bits, average_bits, bits_per_weight,
                                                  input_power, relative_rounding_error)

from test_pipeline import whisper_samples


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_bits_per_weight_is_what_a_quantlinear_stores(bits, group_size):
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 96), bits=bits, group_size=group_size)
    stored = 8 * sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))
    assert stored / (128 * 96) == pytest.approx(bits_per_weight(bits, group_size, 128, 96), rel=1e-12)


def _candidate(name, n_rows, k, outliers=0):
    weight = torch.randn(n_rows, k)
    power = torch.rand(k, dtype=torch.float64) + 0.5
    if outliers:
        # Large weights on inputs that are nearly silent stretch the min-max grid of their groups:
        # the columns that carry the output are rounded coarsely, a high relative error.
        weight[:, :outliers] *= 40
        power[:outliers] = 1e-6
    return GroupCandidate((name,), [weight], power)


def test_relative_error_falls_with_width_and_is_scale_free():
    candidate = _candidate("a", 64, 128)
    errors = [relative_rounding_error(candidate, bits, 32, False) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3
    scaled = GroupCandidate(("a",), [candidate.weights[0] * 8.0], candidate.input_power * 3.0)
    assert relative_rounding_error(scaled, 3, 32, False) == pytest.approx(errors[1], rel=1e-9)   # a power of two: the same codes


def test_allocation_respects_the_budget_and_upgrades_the_most_sensitive_group_first():
    # 3 bits with its scales, zeros and group index: 3 + 19/128 + 32/512 = 3.21 bits per weight.
    candidates = [_candidate(f"g{i}", 512, 256) for i in range(6)] + [_candidate("outliers", 512, 256, outliers=4)]
    config = QuantConfig(bits=3, group_size=128, avg_bits=3.4)
    plan = allocate_bits(candidates, config)
    assert set(plan) == {c.names[0] for c in candidates} and set(plan.values()) <= {3, 4}
    stored = {c.names[0]: c.stored_bits(plan[c.names[0]], 128) for c in candidates}
    total = sum(c.n_weights for c in candidates)
    assert sum(stored.values()) / total <= 3.4 + 1e-12
    assert plan["outliers"] == 4 and list(plan.values()).count(4) == 1
    # Greedy fill: no group left at 3 bits would still fit in what is left of the budget.
    slack = 3.4 * total - sum(stored.values())
    assert slack < candidates[0].stored_bits(4, 128) - candidates[0].stored_bits(3, 128)

    everything = allocate_bits(candidates, QuantConfig(bits=3, group_size=128, avg_bits=4.5))
    assert set(everything.values()) == {4}
    with pytest.raises(ValueError, match=r"avg_bits 3.2 is below the 3\.2109 bits per weight"):
        allocate_bits(candidates, QuantConfig(bits=3, group_size=128, avg_bits=3.2))


def test_config_refuses_budgets_it_cannot_use():
    with pytest.raises(ValueError, match="avg_bits must be a number above bits"):
        QuantConfig(bits=3, avg_bits=3)
    with pytest.raises(ValueError, match="avg_bits needs a bits value with a wider grid"):
        QuantConfig(bits=8, avg_bits=9)
    config = QuantConfig(bits=3, avg_bits=3.4)
    assert config.with_bits(3) is config
    assert config.with_bits(4).bits == 4 and config.with_bits(4).avg_bits is None


def test_input_power_is_the_mean_square_over_rows_with_audio_and_tokens(tiny_whisper):
    model, adapter = tiny_whisper, get_adapter(tiny_whisper)
    samples = whisper_samples(2)
    targets = {"model.encoder.layers.1.fc1": ("encoder", OWN_TOKENS),
               "model.decoder.layers.0.encoder_attn.k_proj": ("decoder", ENCODER_FRAMES),
               "model.decoder.layers.1.self_attn.q_proj": ("decoder", OWN_TOKENS)}
    power = input_power(model, samples, adapter, targets)
    # Reference: capture each layer's whole input per utterance, keep the valid rows by hand.
    rows = {name: [] for name in targets}
    with torch.no_grad():
        for sample in samples:
            captured = {}
            handles = [model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: captured.__setitem__(name, a[0][0].double())) for name in targets]
            model(input_features=sample.encoder_input[None], decoder_input_ids=sample.decoder_ids[None])
            for handle in handles:
                handle.remove()
            frames = adapter.encoder_valid_frames(model, sample.n_samples, 1500)
            for name, (stack, mask) in targets.items():
                x = captured[name]
                rows[name].append(x[:frames] if stack == "encoder" or mask == ENCODER_FRAMES else x)
    for name in targets:
        expected = torch.cat(rows[name]).pow(2).mean(0)
        torch.testing.assert_close(power[name], expected, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_mixed_precision_run_saves_and_loads_with_each_layer_width(tiny_whisper, tmp_path):
    model = tiny_whisper
    # d_model 64, groups of 32: 3 bits store 4.09 bits per weight, 4 bits 5.13 (scales, zeros, g_idx).
    config = QuantConfig(method="fade", bits=3, group_size=32, avg_bits=4.6)
    report = quantize_model(model, whisper_samples(), config, batch_size=4, progress=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    widths = {name: layer.bits for name, layer in layers.items()}
    assert set(widths.values()) == {3, 4} and widths == report.layer_bits
    for block in ("model.encoder.layers.0", "model.decoder.layers.1"):
        assert len({widths[f"{block}.self_attn.{p}_proj"] for p in "qkv"}) == 1   # one sweep, one width
    assert report.average_bits == pytest.approx(average_bits(model)) and report.average_bits <= 4.6
    assert "bits per weight" in report.summary()

    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert {name: m.bits for name, m in loaded.named_modules() if isinstance(m, QuantLinear)} == widths
    sample = whisper_samples(1)[0]
    with torch.no_grad():
        expected = model(input_features=sample.encoder_input[None], decoder_input_ids=sample.decoder_ids[None]).logits
        got = loaded(input_features=sample.encoder_input[None], decoder_input_ids=sample.decoder_ids[None]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cli_names_the_option_of_an_unusable_budget(tiny_whisper, monkeypatch, capsys, tmp_path):
    import fade_kernels.cli as cli

    monkeypatch.setattr(cli, "load_cli_model", lambda spec: (copy.deepcopy(tiny_whisper), None))
    code = main(["quantize", "--model", "m", "--method", "rtn", "--bits", "4", "--avg-bits", "3.5",
                 "--out", str(tmp_path / "out"), "--quiet", "--no-resume"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--avg-bits: avg_bits must be a number above bits (4), got 3.5" in err[0]


@pytest.mark.slow
def test_cli_writes_mixed_widths_and_the_head_group_size(assets, tmp_path):
    from reliability.faults import quantize_args

    out = tmp_path / "out"
    assert main(quantize_args(assets, out, "--bits", "3", "--avg-bits", "4.6", "--head", "bits4",
                              "--head-group-size", "64", "--no-resume")) == 0
    model = load_quantized(out)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size) == (4, 64)
    widths = {m.bits for m in model.modules() if isinstance(m, QuantLinear) and m is not head}
    assert widths == {3, 4} and average_bits(model) <= 4.6


def test_random_rule_fills_the_same_budget_in_a_drawn_order(_fresh_seed):
    candidates = [_candidate(f"g{i}", 512, 256) for i in range(6)] + [_candidate("outliers", 512, 256, outliers=4)]
    total = sum(c.n_weights for c in candidates)
    config = QuantConfig(bits=3, group_size=128, avg_bits=3.4, avg_bits_rule="random")
    plans = []
    for seed in range(8):
        torch.manual_seed(_fresh_seed + seed)
        plan = allocate_bits(candidates, config)
        stored = sum(c.stored_bits(plan[c.names[0]], 128) for c in candidates)
        assert stored / total <= 3.4 + 1e-12 and list(plan.values()).count(4) == 1   # room for exactly one
        plans.append(plan)
    # Eight draws over seven groups: the upgraded group is not always the most sensitive one.
    assert len({next(name for name, bits in p.items() if bits == 4) for p in plans}) > 1
    torch.manual_seed(_fresh_seed)
    assert allocate_bits(candidates, config) == plans[0]
    with pytest.raises(ValueError, match="avg_bits_rule"):
        QuantConfig(bits=3, avg_bits=3.5, avg_bits_rule="largest")
