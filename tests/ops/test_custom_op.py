"""`fade::quant_linear`: torch.library.opcheck, torch.compile(fullgraph=True), autograd."""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from torch import nn

import fade_kernels.ops  # noqa: F401 (registers every backend)
from fade_kernels.ops import cpu
from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.ops.custom_op import quant_linear
from fade_kernels.ops.reference import reference_forward


def _layer(gen, k, n, bits, group_size, bias=True):
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return QuantLinear.from_linear(linear, bits=bits, group_size=group_size)


def _args(layer, x, backend=None):
    return (x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, layer.bits, layer.group_size,
            layer.out_features, backend)


@pytest.mark.slow
@pytest.mark.parametrize("bits,bias,backend,grad", [(4, True, None, True), (3, False, "torch", False)])
def test_opcheck(bits, bias, backend, grad, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    layer = _layer(gen, 64, 40, bits, 32, bias)
    x = torch.randn(3, 64, generator=gen, requires_grad=grad)
    # Schema, fake tensor, autograd registration and AOT dispatch (static and dynamic shapes).
    torch.library.opcheck(torch.ops.fade.quant_linear.default, _args(layer, x, backend))


@pytest.mark.parametrize("bits", [3, 4])
def test_op_matches_reference_and_its_gradient(bits, _fresh_seed, monkeypatch):
    # fp32 activations: the op's plumbing against the reference at fp32 tolerance (the int8
    # kernel's own error bound is tested in test_cpu_q8.py).
    from fade_kernels.ops import cpu
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")
    gen = torch.Generator().manual_seed(_fresh_seed)
    layer = _layer(gen, 96, 40, bits, 32)
    x = torch.randn(2, 5, 96, generator=gen, requires_grad=True)
    y = quant_linear(*_args(layer, x))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_forward(x_ref, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, bits, 40)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)  # dx = dy @ W_hat


def test_fake_shape_and_dtype():
    layer = QuantLinear(64, 24, bits=3, group_size=32)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        x = torch.empty(2, 7, 64, dtype=torch.bfloat16)
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _args(layer, x))
        args = (x,) + args[1:]
        y = torch.ops.fade.quant_linear(*args)
    assert y.shape == (2, 7, 24) and y.dtype == torch.bfloat16


class TinyBlock(nn.Module):
    """A decoder-MLP-like block: QuantLinear -> GELU -> QuantLinear, plus a residual."""

    def __init__(self, gen, bits):
        super().__init__()
        self.fc1 = _layer(gen, 64, 128, bits, 32)
        self.fc2 = _layer(gen, 128, 64, bits, 64)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_compile_fullgraph_eager_backend_uses_the_op(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    block = TinyBlock(gen, 4).eval()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
    for shape in [(1, 64), (3, 5, 64)]:  # a second shape: recompiles or runs a dynamic graph
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert ops.count("fade.quant_linear.default") == 2 * len(graphs), ops


def test_compile_backend_choice_happens_at_run_time(monkeypatch, _fresh_seed):
    """FADE_BACKEND is read inside the op: a compiled model honours (and fails on) it per call."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")  # the CPU kernel that matches torch to fp32 rounding
    gen = torch.Generator().manual_seed(_fresh_seed)
    block = TinyBlock(gen, 3).eval()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        want = compiled(x)
        monkeypatch.setenv("FADE_BACKEND", "torch")
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("FADE_BACKEND", "cuda")
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match=re.escape("backend 'cuda' was requested but cannot run")):
                compiled(x)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FADE_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for ~15-45 s on CPU; set FADE_TEST_INDUCTOR=1 to run it")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="inductor on CPU needs a C++ compiler")
def test_compile_fullgraph_inductor(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    block = TinyBlock(gen, 4).eval()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        # Inductor may fuse the residual add and GELU differently from eager: fp32 rounding only.
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


def test_quant_linear_gradient_goes_through_the_op(monkeypatch, _fresh_seed):
    """A backend without its own autograd formula still gives dx through the op's backward."""
    from fade_kernels.ops.registry import BACKENDS, Backend

    def no_autograd(x, *args):  # detaches: any gradient must come from the custom op
        return reference_forward(x.detach(), *args)

    monkeypatch.setitem(BACKENDS, "plain", Backend(name="plain", fn=no_autograd, devices=("cpu",), bits=(3, 4),
                                                   priority=1))
    gen = torch.Generator().manual_seed(_fresh_seed)
    layer = _layer(gen, 64, 24, 4, 32)
    layer.backend = "plain"
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(3, 64), rtol=1e-5, atol=1e-5)
