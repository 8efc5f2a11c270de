"""Triton backend (fade_kernels.ops.triton_qmatmul) under TRITON_INTERPRET=1 on CPU tensors.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernels, so both kernels
(split-K GEMV and tl.dot GEMM) run in Triton's interpreter with one fixed small config.

Unpacking is checked bit-exactly: one-hot activation rows make each kernel return columns of
W_hat itself ((q - z) * s is exact in fp32 and every other product is a zero), compared with
dequantize_weight by torch.equal. Matmuls on random inputs are compared with the float64 product
of the same quantized weight; the kernel's max error may be at most twice the reference's
(reference_forward in the same dtype) plus an atol of
  fp32/fp16: 4 * 2^-24 of max(|x| @ |W_hat|^T) (a few fp32 roundings of the largest partial sum);
  bf16:      2^-7 of max(|x| @ |W_hat|^T), because Triton 3.9's interpreter converts fp32 to bf16
             by truncation (the GPU rounds to nearest), which costs up to one bf16 ulp on the
             rounded weight and on the output instead of half an ulp.
Shapes are small (the interpreter runs programs one at a time in Python): K multiple of 32 (a
3-bit run), N not a multiple of the 64/32-column tiles, M in {1, 3, 17, ...}.
"""
from __future__ import annotations

import pytest
import torch

from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.ops import triton_qmatmul as tq
from fade_kernels.ops.reference import dequantize_weight, reference_forward
from fade_kernels.ops.registry import BACKENDS, select_backend
from fade_kernels.packing import pack_qweight, pack_qzeros

# Triton kernels under the interpreter: grids of small launches, ~0.1-1 s each.
pytestmark = [pytest.mark.skipif(tq.triton is None, reason=f"triton unavailable: {tq._IMPORT_ERROR}"),
              pytest.mark.slow]

needs_interpreter = pytest.mark.skipif(not tq.INTERPRET, reason="kernels run on CPU tensors only with TRITON_INTERPRET=1")


def random_gptq(k: int, n: int, bits: int, group_size: int, seed: int):
    """Arbitrary codes / zeros / scales (every code and zero value occurs), packed. group_size -1: one group."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = k // gs
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 2 ** bits, (n, groups), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 1e-3).half()
    g_idx = (torch.arange(k) // gs).to(torch.int32)
    bias = torch.randn(n, generator=g)
    return pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx, bias


def random_x(shape, dtype, seed: int) -> torch.Tensor:
    # A non-zero mean (as after GELU) exposes cancellation; the scale keeps fp16 far from overflow.
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.5).to(dtype)


def assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, bias, bits, n):
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, n).double()      # (N, K), exact
    xd = x.double()
    truth = xd @ w.t() + (0 if bias is None else bias.double())
    ref = reference_forward(x, qweight, qzeros, scales, g_idx, bias, bits, n)
    magnitude = float((xd.abs() @ w.abs().t()).max())
    atol = (2.0 ** -7 if x.dtype == torch.bfloat16 else 4 * 2.0 ** -24) * magnitude
    ref_err = float((ref.double() - truth).abs().max())
    err = float((ours.double() - truth).abs().max())
    assert ours.dtype == x.dtype and ours.shape == ref.shape
    assert err <= 2 * ref_err + atol, f"max error {err:.3g} > 2 * reference {ref_err:.3g} + atol {atol:.3g}"


# (bits, M, K, N, group_size, dtype, split_k, bias)
GEMV_CASES = [
    (3, 1, 256, 40, 32, torch.float32, None, True),
    (3, 3, 192, 96, 64, torch.float16, 2, False),     # split-K
    (4, 1, 256, 200, -1, torch.float32, 3, True),     # one group: 2 steps of 4 runs, split 3 -> 2
    (4, 3, 64, 40, 32, torch.bfloat16, None, True),
    (3, 17, 64, 40, 64, torch.float32, 2, True),      # three BLOCK_M = 8 row blocks, last one partial
    (3, 2, 96, 40, -1, torch.float32, 2, True),       # K = 3 runs: a masked run in the last step
    (2, 2, 64, 40, 32, torch.float32, None, True),
    (8, 1, 64, 40, 64, torch.float16, None, True),
]

# (bits, M, K, N, group_size, dtype, bias)
GEMM_CASES = [
    (3, 17, 256, 200, 32, torch.float32, True),
    (4, 17, 192, 96, 64, torch.float16, True),
    (3, 33, 64, 40, -1, torch.bfloat16, False),
    (4, 1, 64, 40, 32, torch.float32, True),          # one row in a 16-row tile
    (3, 3, 96, 40, -1, torch.float16, True),          # K = 96: the second 64-wide K-step is half masked
    (2, 18, 64, 40, 64, torch.float32, True),
    (8, 5, 64, 40, 32, torch.float32, False),
]


@needs_interpreter
@pytest.mark.parametrize("bits,m,k,n,group_size,dtype,split_k,with_bias", GEMV_CASES)
def test_gemv_matches_reference(bits, m, k, n, group_size, dtype, split_k, with_bias, _fresh_seed):
    qweight, qzeros, scales, g_idx, bias = random_gptq(k, n, bits, group_size, _fresh_seed)
    bias = bias if with_bias else None
    x = random_x((m, k), dtype, _fresh_seed + 1)
    y = tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, bits, n, path="gemv", split_k=split_k)
    assert_close_to_truth(y, x, qweight, qzeros, scales, g_idx, bias, bits, n)


@needs_interpreter
@pytest.mark.parametrize("bits,m,k,n,group_size,dtype,with_bias", GEMM_CASES)
def test_gemm_matches_reference(bits, m, k, n, group_size, dtype, with_bias, _fresh_seed):
    qweight, qzeros, scales, g_idx, bias = random_gptq(k, n, bits, group_size, _fresh_seed)
    bias = bias if with_bias else None
    x = random_x((m, k), dtype, _fresh_seed + 1)
    y = tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, bits, n, path="gemm")
    assert_close_to_truth(y, x, qweight, qzeros, scales, g_idx, bias, bits, n)


@needs_interpreter
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_one_hot_rows_return_the_dequantized_weight_exactly(bits, path, _fresh_seed):
    """Bit-exact unpacking: x = rows of the identity, so y[i] = W_hat[:, k_i] with no rounding."""
    k, n, group_size = 128, 72, 32
    qweight, qzeros, scales, g_idx, _ = random_gptq(k, n, bits, group_size, _fresh_seed)
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, n)                # (N, K) fp32
    # Both straddling codes of each 3-bit run (10, 21), run ends (31, 32) and a random pick; 16 rows
    # keeps the GEMV under GEMV_MAX_M.
    g = torch.Generator().manual_seed(_fresh_seed)
    fixed = torch.tensor([0, 9, 10, 11, 20, 21, 22, 31, 32, 42, 53, 127])
    picks = torch.cat([fixed, torch.randperm(k, generator=g)[:4]])
    x = torch.eye(k)[picks]                                                        # (16, K) fp32
    y = tq.triton_forward(x, qweight, qzeros, scales, g_idx, None, bits, n, path=path)
    assert torch.equal(y, w.t()[picks])


@needs_interpreter
def test_symmetric_grid_needs_no_special_path(_fresh_seed):
    """A symmetric layer stores zero 2^(bits-1) in qzeros; the same kernels read it."""
    g = torch.Generator().manual_seed(_fresh_seed)
    linear = torch.nn.Linear(64, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 64, generator=g) * 0.05)
    layer = QuantLinear.from_linear(linear, bits=3, group_size=32, sym=True)
    x = random_x((3, 64), torch.float32, _fresh_seed)
    for path in ("gemv", "gemm"):
        y = tq.triton_forward(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, 3, 40, path=path)
        assert_close_to_truth(y, x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, 3, 40)


@needs_interpreter
@pytest.mark.parametrize("lead,expected", [((2, 3), "qgemv"), ((2, 9), "qgemm")])
def test_auto_path_by_rows_and_3d_input(lead, expected, monkeypatch, _fresh_seed):
    """M = 6 <= GEMV_MAX_M goes to the GEMV, M = 18 to the GEMM; the leading dims are restored."""
    calls = []
    for name in ("qgemv", "qgemm"):
        real = getattr(tq, name)
        monkeypatch.setattr(tq, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 4, 32, _fresh_seed)
    x = random_x((*lead, 64), torch.float16, _fresh_seed + 1)
    y = tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, 4, 40)
    assert calls == [expected]
    assert y.shape == (*lead, 40)
    assert_close_to_truth(y, x, qweight, qzeros, scales, g_idx, bias, 4, 40)


@needs_interpreter
def test_gradient_with_respect_to_x(_fresh_seed):
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 3, 32, _fresh_seed)
    x = random_x((2, 64), torch.float32, _fresh_seed + 1).requires_grad_()
    tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, 3, 40).sum().backward()
    w = dequantize_weight(qweight, qzeros, scales, g_idx, 3, 40)
    torch.testing.assert_close(x.grad, w.sum(dim=0).expand(2, -1), rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_empty_batch():
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 4, 32, 0)
    y = tq.triton_forward(torch.empty(0, 64), qweight, qzeros, scales, g_idx, bias, 4, 40)
    assert y.shape == (0, 40)


# ---- validation (no kernel launch) -------------------------------------------------------------

def test_rejects_bad_arguments():
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 3, 32, 0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, 5, 40)
    with pytest.raises(ValueError, match="in_features=64"):
        tq.triton_forward(torch.randn(2, 32), qweight, qzeros, scales, g_idx, bias, 3, 40)
    with pytest.raises(ValueError, match="out_features=41"):
        tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, 3, 41)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        tq.triton_forward(x.double(), qweight, qzeros, scales, g_idx, bias, 3, 40)
    with pytest.raises(ValueError, match=r"qzeros must have shape \[2, 6\]"):
        tq.triton_forward(x, qweight, qzeros[:, :2], scales, g_idx, bias, 3, 40)
    with pytest.raises(ValueError, match="scales must have shape"):
        tq.triton_forward(x, qweight, qzeros, scales[:, :39], g_idx, bias, 3, 40)
    with pytest.raises(ValueError, match=r"bias must have shape \[N=40\]"):
        tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias[:39], 3, 40)
    with pytest.raises(ValueError, match="path must be"):
        tq.triton_forward(x, qweight, qzeros, scales, g_idx, bias, 3, 40, path="fast")


def test_rejects_groups_not_multiple_of_32():
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 4, 16, 0)
    with pytest.raises(ValueError, match="group_size must be a multiple of 32"):
        tq.triton_forward(torch.randn(1, 64), qweight, qzeros, scales, g_idx, bias, 4, 40)


def test_rejects_act_order_g_idx():
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 4, 32, 0)
    permuted = g_idx[torch.randperm(64)]
    with pytest.raises(ValueError, match=r"g_idx must be the trivial arange\(K\) // group_size"):
        tq.triton_forward(torch.randn(1, 64), qweight, qzeros, scales, permuted, bias, 4, 40)
    with pytest.raises(ValueError, match=r"g_idx must have shape \[K=64\]"):
        tq.triton_forward(torch.randn(1, 64), qweight, qzeros, scales, g_idx[:32], bias, 4, 40)


def test_g_idx_check_is_redone_after_in_place_change():
    """The per-tensor cache of the g_idx check must notice an in-place edit (version bump)."""
    qweight, qzeros, scales, g_idx, bias = random_gptq(64, 40, 4, 32, 0)
    tq.check_static_g_idx(g_idx, 64, 32)
    g_idx[0] = 1
    with pytest.raises(ValueError, match=r"g_idx must be the trivial arange\(K\) // group_size"):
        tq.check_static_g_idx(g_idx, 64, 32)


def test_registered_backend():
    backend = BACKENDS["triton"]
    assert backend.priority == 20 and backend.devices == ("cuda",) and {3, 4} <= set(backend.bits)
    available, why = tq.triton_available()
    assert backend.available == available and backend.why_unavailable == why
    if not torch.cuda.is_available():
        assert not backend.available and "cuda" in backend.why_unavailable.lower()
        with pytest.raises(RuntimeError, match="'triton' was requested but cannot run"):
            select_backend(1, 4, 128, "cuda", requested="triton")
    # Never picked for CPU tensors, even under the interpreter.
    with pytest.raises(RuntimeError, match="cannot run"):
        select_backend(1, 4, 128, "cpu", requested="triton")
    assert not backend.supports(1, 4, 48, "cuda")
