"""Backend dispatch: the explicit auto order, forced backends, and `fade info`.

Availability depends on the machine (no GPU here), so the order tests swap in available copies
of the registry records with monkeypatch; the real records are checked for their reasons.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import fade_kernels.ops  # noqa: F401 (registers every backend)
from fade_kernels.cli import main
from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.ops.cuda import cuda_forward
from fade_kernels.ops.registry import AUTO_ORDER, BACKENDS, Backend, auto_order, select_backend


def test_auto_order_is_explicit_per_device():
    assert AUTO_ORDER == {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
    assert [b.name for b in auto_order("cuda")] == ["cuda", "triton", "torch"]
    assert [b.name for b in auto_order("cpu")] == ["cpu", "torch"]


def test_cuda_backend_record():
    cuda = BACKENDS["cuda"]
    assert cuda.devices == ("cuda",) and cuda.bits == (3, 4) and cuda.priority == 5
    assert cuda.supports(8, 4, 128, "cuda") and not cuda.supports(9, 4, 128, "cuda")
    assert not cuda.supports(1, 4, 48, "cuda")  # group size not a multiple of 32
    if not torch.cuda.is_available():
        assert not cuda.available and cuda.why_unavailable


@pytest.fixture
def all_available(monkeypatch):
    """Every backend of the auto orders available (records copied, the registry restored after)."""
    for name, devices, bits in (("cuda", ("cuda",), (3, 4)), ("triton", ("cuda",), (2, 3, 4, 8)),
                                ("cpu", ("cpu",), (3, 4))):
        if name in BACKENDS:
            record = dataclasses.replace(BACKENDS[name], available=True, why_unavailable="")
        else:  # a backend whose module is absent from this tree: a stand-in with its contract
            record = Backend(name=name, fn=None, devices=devices, bits=bits, priority=50)
        monkeypatch.setitem(BACKENDS, name, record)


@pytest.mark.parametrize("m,bits,group_size,want", [
    (1, 4, 128, "cuda"), (8, 3, 32, "cuda"),   # decode sizes: the hand-written kernel
    (9, 4, 128, "triton"), (1500, 3, 128, "triton"),  # beyond the GEMV's M <= 8
    (1, 2, 128, "triton"), (1, 8, 64, "triton"),      # widths only Triton has
])
def test_auto_order_on_cuda_tensors(all_available, m, bits, group_size, want):
    assert select_backend(m, bits, group_size, "cuda").name == want


def test_auto_falls_through_unavailable_backends(all_available, monkeypatch):
    monkeypatch.setitem(BACKENDS, "cuda", dataclasses.replace(BACKENDS["cuda"], available=False, why_unavailable="x"))
    assert select_backend(1, 4, 128, "cuda").name == "triton"
    monkeypatch.setitem(BACKENDS, "triton", dataclasses.replace(BACKENDS["triton"], available=False))
    assert select_backend(1, 4, 128, "cuda").name == "torch"


@pytest.mark.parametrize("m,bits,want", [(1, 4, "cpu"), (1500, 3, "cpu"), (1, 2, "torch"), (1, 8, "torch")])
def test_auto_order_on_cpu_tensors(all_available, m, bits, want):
    assert select_backend(m, bits, 128, "cpu").name == want


def test_backends_outside_the_order_run_only_when_named(all_available, monkeypatch):
    # Triton on CPU tensors (the interpreter) must never be picked by auto.
    monkeypatch.setitem(BACKENDS, "triton", dataclasses.replace(BACKENDS["triton"], devices=("cuda", "cpu"),
                                                                supports=lambda m, bits, group_size, device: True))
    monkeypatch.setitem(BACKENDS, "cpu", dataclasses.replace(BACKENDS["cpu"], available=False))
    assert select_backend(1, 4, 128, "cpu").name == "torch"
    assert select_backend(1, 4, 128, "cpu", "triton").name == "triton"


def test_forced_unavailable_backend_raises_with_its_reason(monkeypatch):
    reason = "no GPU in this test"
    monkeypatch.setitem(BACKENDS, "cuda", dataclasses.replace(BACKENDS["cuda"], available=False, why_unavailable=reason))
    with pytest.raises(RuntimeError, match=re.escape(f"backend 'cuda' was requested but cannot run: {reason}")):
        select_backend(1, 4, 128, "cuda", "cuda")
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32, backend="cuda")(torch.randn(1, 64))
    monkeypatch.setenv("FADE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        layer(torch.randn(1, 64))


def test_forced_backend_that_cannot_take_the_call_says_why(all_available):
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but cannot run: does not support M=9"):
        select_backend(9, 4, 128, "cuda", "cuda")
    with pytest.raises(RuntimeError, match=r"does not run on cpu tensors \(runs on cuda\)"):
        select_backend(1, 4, 128, "cpu", "cuda")
    with pytest.raises(RuntimeError, match=r"does not support bits=2 \(supports \(3, 4\)\)"):
        select_backend(1, 2, 128, "cuda", "cuda")


def test_the_real_cuda_backend_without_a_gpu_explains_itself():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    why = BACKENDS["cuda"].why_unavailable
    with pytest.raises(RuntimeError, match=re.escape(f"backend 'cuda' was requested but cannot run: {why}")):
        select_backend(1, 4, 128, "cuda", "cuda")
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    with pytest.raises(RuntimeError, match="the CUDA backend is unavailable"):
        cuda_forward(torch.randn(1, 64), layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, 4, 32)


def test_no_backend_for_an_unknown_device_names_the_device():
    with pytest.raises(RuntimeError, match="no backend can run M=1, bits=4, group_size=128 on mps tensors"):
        select_backend(1, 4, 128, "mps")


def test_fade_info_prints_every_backend_with_its_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for backend in BACKENDS.values():
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(backend.name + " ")), None)
        assert line is not None, f"backend {backend.name} missing from fade info:\n{out}"
        if backend.available:
            assert line.endswith("available") and "unavailable" not in line
        else:
            assert line.endswith(f"unavailable: {backend.why_unavailable}") and backend.why_unavailable
    assert "auto order for cuda tensors: " + " -> ".join(b.name for b in auto_order("cuda")) in out
    assert "auto order for cpu tensors: " + " -> ".join(b.name for b in auto_order("cpu")) in out
