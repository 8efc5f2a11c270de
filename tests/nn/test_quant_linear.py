import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fade_kernels import QuantLinear
from fade_kernels.ops import cpu
from fade_kernels.ops.registry import select_backend
from fade_kernels.solver.rtn import rtn_quantize


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 32), (4, -1), (3, 64)])
def test_from_linear_dequantizes_to_rtn(bits, group_size):
    linear = nn.Linear(256, 40)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=group_size)
    codes, scales, zeros = rtn_quantize(linear.weight.detach(), bits, group_size)
    g = 256 if group_size == -1 else group_size
    expected = (codes.float() - zeros.float().repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    assert torch.equal(layer.dequantize(), expected)


@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (2, 17, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dense_on_dequantized_weight(shape, dtype, monkeypatch):
    # The fp32-activation CPU kernel (the int8 one has its own error bound: tests/ops/test_cpu_q8.py).
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")
    linear = nn.Linear(256, 40)
    layer = QuantLinear.from_linear(linear, bits=4, group_size=64)
    x = torch.randn(shape).to(dtype)
    expected = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 40)
    # fp32: summation-order noise only; bf16: twice torch's own bf16 error on this product.
    torch_error = (F.linear(x, layer.dequantize().to(dtype), layer.bias.to(dtype)).double() - expected).abs().max()
    tolerance = 1e-4 if dtype == torch.float32 else 2 * float(torch_error) + 1e-3
    assert (out.double() - expected).abs().max() <= tolerance


def test_4bit_error_is_smaller_than_3bit():
    linear = nn.Linear(256, 64, bias=False)
    x = torch.randn(32, 256)
    ref = linear(x).detach()
    errors = {bits: float((QuantLinear.from_linear(linear, bits, 64)(x) - ref).norm() / ref.norm()) for bits in (3, 4)}
    assert errors[4] < errors[3] < 0.35


def test_state_dict_round_trip_and_repr():
    layer = QuantLinear.from_linear(nn.Linear(128, 32), bits=3, group_size=32)
    fresh = QuantLinear(128, 32, bits=3, group_size=32)
    fresh.load_state_dict(layer.state_dict())
    for name, buffer in layer.state_dict().items():
        assert torch.equal(buffer, fresh.state_dict()[name]), name
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), fresh(x))
    assert "bits=3" in repr(layer) and "group_size=32" in repr(layer)


def test_no_bias_layer():
    layer = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), bits=4, group_size=32)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert layer(torch.randn(2, 64)).shape == (2, 32)


def test_bad_arguments_name_the_constraint():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantLinear(64, 32, bits=5)
    with pytest.raises(ValueError, match="group_size=128 does not divide the input width in_features=288"):
        QuantLinear(288, 32, bits=4, group_size=128)
    with pytest.raises(ValueError, match="in_features=48 must be a multiple of 32"):
        QuantLinear(48, 32, bits=3, group_size=-1)
    layer = QuantLinear(64, 32, bits=4, group_size=32)
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 63))


def test_forced_backend_runs_or_raises(monkeypatch):
    assert select_backend(1, 4, 128, "cpu", "torch").name == "torch"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        select_backend(1, 4, 128, "cpu", "nonexistent")
    monkeypatch.setenv("FADE_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="nonexistent"):
        QuantLinear.from_linear(nn.Linear(64, 32), 4, 32)(torch.randn(1, 64))


def test_decode_fast_path_follows_buffer_updates_and_backend_requests(monkeypatch):
    """QuantLinear keeps the backend's bound forward between calls: it must notice a new state dict
    (in-place copies), a replaced buffer and FADE_BACKEND."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")
    a = QuantLinear.from_linear(nn.Linear(256, 40), bits=4, group_size=64)
    b = QuantLinear.from_linear(nn.Linear(256, 40), bits=4, group_size=64)
    x = torch.randn(1, 256)
    with torch.no_grad():
        y_a, y_b = a(x), b(x)
        a.load_state_dict(b.state_dict())                              # in-place copies: versions change
        assert torch.equal(a(x), y_b)
        a.scales = a.scales * 2                                        # a new buffer tensor
        torch.testing.assert_close(a(x) - a.bias, 2 * (y_b - b.bias), rtol=1e-5, atol=1e-5)
        three = torch.randn(3, 256)                                    # another M: bound for it
        torch.testing.assert_close(a(three), F.linear(three, a.dequantize(), a.bias), rtol=1e-5, atol=1e-5)
        a.backend = "nonexistent"                                      # the layer's own request is read too
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            a(x)
        a.backend = None
        monkeypatch.setenv("FADE_BACKEND", "torch")
        want = F.linear(x, a.dequantize(), a.bias)
        torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y_a, y_b)
