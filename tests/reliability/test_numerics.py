"""Numerics: non-finite weights or statistics and float16 scale overflow are errors naming the
layer; an all-zero Hessian warns; bad solver arguments and inputs are refused."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.numerics import NumericalError, solving
from fade_kernels.solver.gptq import gptq_quantize
from fade_kernels.solver.rtn import rtn_quantize
from faults import error_line, quantize_args, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=64, k=128):
    weight = torch.randn(n, k)
    x = torch.randn(4 * k, k)
    return weight, x.T @ x / x.shape[0]


@pytest.mark.parametrize("sweep", ["torch", "cpp"])
@pytest.mark.parametrize("damage", ["nan weight", "inf weight", "inf hessian", "nan hessian"])
def test_gptq_refuses_non_finite_inputs_naming_the_layer(damage, sweep):
    from fade_kernels.solver.gptq import cpp_sweep_available

    if sweep == "cpp" and not cpp_sweep_available()[0]:
        pytest.skip(cpp_sweep_available()[1])
    weight, hessian = problem()
    value = float("nan") if "nan" in damage else float("inf")
    target = weight if "weight" in damage else hessian
    target[3, 5] = value
    with solving("model.encoder.layers.0.fc1"), pytest.raises(NumericalError) as info:
        gptq_quantize(weight, hessian, bits=4, group_size=32, sweep=sweep)
    what = "weight" if "weight" in damage else "hessian"
    assert str(info.value).startswith(f"model.encoder.layers.0.fc1: {what} has 1 non-finite values")


def test_rtn_refuses_non_finite_weight():
    weight, _ = problem()
    weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="weight has 1 non-finite values"):
        rtn_quantize(weight, 4, 32)


@pytest.mark.parametrize("sweep", ["torch", "cpp"])
def test_scale_overflowing_float16_is_refused(sweep):
    from fade_kernels.solver.gptq import cpp_sweep_available

    if sweep == "cpp" and not cpp_sweep_available()[0]:
        pytest.skip(cpp_sweep_available()[1])
    weight, hessian = problem()
    weight *= 1e6   # 4-bit scales near 1e6 * range / 15, far beyond float16's 65504
    with solving("model.decoder.layers.1.fc2"), pytest.raises(NumericalError, match=r"model\.decoder\.layers\.1\.fc2: a "
                                                                                  r"quantization scale of .* exceeds float16"):
        gptq_quantize(weight, hessian, bits=4, group_size=32, sweep=sweep)


def test_quant_linear_from_linear_with_huge_weight_never_outputs_nan():
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight[0, 0] = 1e6
    with pytest.raises(NumericalError, match="exceeds float16's maximum 65504"):
        QuantLinear.from_linear(linear, bits=4, group_size=32)
    with torch.no_grad():
        linear.weight[0, 0] = 6e4   # the largest scale still fits: finite output
    layer = QuantLinear.from_linear(linear, bits=4, group_size=32)
    assert torch.isfinite(layer.scales).all() and torch.isfinite(layer(torch.randn(3, 128))).all()


def test_all_zero_hessian_warns():
    weight, _ = problem()
    with solving("model.encoder.layers.1.self_attn.q_proj"), pytest.warns(RuntimeWarning) as record:
        gptq_quantize(weight, torch.zeros(128, 128), bits=4, group_size=32)
    assert "model.encoder.layers.1.self_attn.q_proj: every input of this layer was zero" in str(record[0].message)
    _, hessian = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq_quantize(weight, hessian, bits=4, group_size=32)   # a normal Hessian: no warning


@pytest.mark.parametrize("damp", [-1, -1e-9, float("nan"), float("inf")])
def test_negative_or_non_finite_damp_is_refused(damp):
    weight, hessian = problem()
    with pytest.raises(ValueError, match="damp must be a finite number >= 0"):
        gptq_quantize(weight, hessian, bits=4, group_size=32, damp=damp)


@pytest.mark.parametrize("shape", [(0, 128), (64, 0)])
def test_empty_weight_is_refused(shape):
    with pytest.raises(ValueError, match=r"GPTQ needs at least one row and one column"):
        gptq_quantize(torch.zeros(shape), torch.eye(shape[1]), bits=4, group_size=-1)


def test_zero_dimensional_input_to_quant_linear():
    layer = QuantLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.model.encoder.layers[1].fc1.weight.__setitem__((2, 3), float("nan")),
     "model.encoder.layers.1.fc1: weight has 1 non-finite values"),
    (lambda m: m.model.decoder.layers[0].self_attn.v_proj.weight.__setitem__((0, 0), 1e6),
     "model.decoder.layers.0.self_attn.q_proj, model.decoder.layers.0.self_attn.k_proj, "
     "model.decoder.layers.0.self_attn.v_proj: a quantization scale"),
])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_names_the_layer(assets, tmp_path, fade, edit, message, method):
    model = save_tiny_model(tmp_path / "broken", edit=edit)
    args = quantize_args(assets, tmp_path / "q", "--method", method)
    args[args.index("--model") + 1] = str(model)
    code, _, err = fade(*args)
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "q").exists()
