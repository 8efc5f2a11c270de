"""CPU backend (fade_kernels.ops.cpu, csrc/cpu): correctness against the torch reference.

Integers and the dequantized weight are compared bit-exactly (torch.equal). Matmul outputs are
compared with the float64 product of the same quantized weight: the kernel's error may be at most
twice the error of torch's own reference in the same dtype plus a stated atol (fp32: 4 units of
roundoff, 4 * 2^-24, of the |x| @ |W|^T magnitude, far below the sqrt(K) * 2^-24 typical of any
fp32 dot product; bf16: 2^-8 of the largest output). Activations have a non-zero mean (as GELU
outputs do), which is what exposes cancellation in a Σ x*q − z*Σx formulation.
Every kernel family this CPU can run (avx512, avx2, scalar) goes through the same sweep.
These tests pin the fp32-activation kernel (activations="fp32"); the int8-activation kernel has
its own error model and tests (test_cpu_q8.py).
"""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from fade_kernels.nn.quant_linear import QuantLinear
from fade_kernels.ops import cpu
from fade_kernels.ops.reference import dequantize_weight, reference_forward
from fade_kernels.ops.registry import BACKENDS, select_backend
from fade_kernels.packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

AVAILABLE, REASON = cpu.cpu_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU extension not built: {REASON}")



@pytest.fixture(autouse=True)
def fp32_activations(monkeypatch):
    """Every call in this module without an explicit mode uses the fp32-activation kernel."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")


def make_layer(k: int, n: int, bits: int, group_size: int, sym: bool, bias: bool = True, seed: int = 0):
    """Random GPTQ tensors from the real RTN path: (qweight, qzeros, scales, g_idx, bias, layer).

    Fresh copies of a cached build: the sweep reuses each layer across kernel families and paths.
    """
    layer = _build_layer(k, n, bits, group_size, sym, bias, seed)
    copy = QuantLinear(k, n, bits, group_size, bias=bias, sym=sym)
    copy.load_state_dict(layer.state_dict())
    return copy.qweight, copy.qzeros, copy.scales, copy.g_idx, copy.bias, copy


@functools.lru_cache(maxsize=None)
def _build_layer(k: int, n: int, bits: int, group_size: int, sym: bool, bias: bool, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_linear(linear, bits=bits, group_size=group_size, sym=sym)


def random_gptq(k: int, n: int, bits: int, group_size: int, seed: int = 0, generator: torch.Generator | None = None):
    """Arbitrary codes / zeros / scales (every code value and every zero), packed:
    (qweight, qzeros, scales, g_idx). Drawn from `generator` when given, else from `seed`."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 2 ** bits, (n, groups), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 1e-3).half()
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    return pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx


def assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, bias, bits, n, weight_kn=False):
    """ours vs float64 truth, with torch's own error in x's dtype as the yardstick.

    weight_kn: the kernel multiplied by W^T stored [K, N] (the dequant path): at small M, BLAS
    then accumulates each output sequentially along K, unlike F.linear's dot products over a
    [N, K] weight, so the yardstick is torch's error for that same GEMM (torch.mm(x, W^T)).
    """
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, n).double()         # (N, K)
    truth = x.double() @ w.t() + (0 if bias is None else bias.double())
    ref = reference_forward(x, qweight, qzeros, scales, g_idx, bias, bits, n)
    if weight_kn:
        w_kn = w.t().contiguous().to(x.dtype)                                        # (K, N)
        ref_kn = torch.mm(x, w_kn) if bias is None else torch.addmm(bias.to(x.dtype), x, w_kn)
        if (ref_kn.double() - truth).abs().max() > (ref.double() - truth).abs().max():
            ref = ref_kn
    assert ours.dtype == x.dtype and ours.shape == ref.shape
    torch_err = (ref.double() - truth).abs().max().item()
    our_err = (ours.double() - truth).abs().max().item()
    if x.dtype == torch.float32:
        atol = 4 * 2 ** -24 * (x.double().abs() @ w.abs().t()).max().item()
    else:
        atol = 2 ** -8 * truth.abs().max().item()
    assert our_err <= 2 * torch_err + atol, f"error {our_err:.3g} vs torch {torch_err:.3g} (atol {atol:.3g})"


# ---- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("k,n,group_size", [(96, 1, 32), (288, 17, 32), (384, 384, 128), (416, 1000, -1)])
def test_repack_round_trip_is_bit_exact(bits, k, n, group_size):
    gs = k if group_size == -1 else group_size
    qweight, qzeros, scales, _ = random_gptq(k, n, bits, gs)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits, group_size)
    tiles = (n + cpu.TILE_N - 1) // cpu.TILE_N
    kg = packed["kernel_group"]
    assert kg <= cpu.KERNEL_GROUP_MAX and gs % kg == 0 and kg % 32 == 0
    assert packed["words"].shape == (tiles, k * bits // 32, cpu.TILE_N)
    assert packed["scales"].shape == packed["zeros"].shape == packed["dsum"].shape == (tiles, k // kg, cpu.TILE_N)
    back = cpu.unpack_from_cpu(packed)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros) and torch.equal(back[2], scales)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("k,n,group_size", [(288, 17, 32), (384, 40, 64), (384, 33, 128), (416, 5, 416)])
def test_dequantize_is_bit_exact(isa, bits, k, n, group_size):
    qweight, qzeros, scales, g_idx = random_gptq(k, n, bits, group_size)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    w_t = cpu._C.dequantize_t(packed["words"], packed["scales"], packed["zeros"], bits, packed["kernel_group"], n)
    assert torch.equal(w_t.t(), dequantize_weight(qweight, qzeros, scales, g_idx, bits, n))


@pytest.mark.parametrize("bits", [3, 4])
def test_dsum_is_the_group_sum_of_centred_codes(bits):
    qweight, qzeros, scales, g_idx = random_gptq(416, 40, bits, 416)  # full row: split into kernel groups
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    kg = packed["kernel_group"]
    codes = unpack_qweight(qweight, bits)                                        # (N, K)
    zeros = unpack_qzeros(qzeros, bits, 40)                                      # (N, 1)
    want = (codes - zeros).reshape(40, 416 // kg, kg).sum(-1).t()                # (Gk, N)
    assert torch.equal(cpu._untile(packed["dsum"], 40).to(torch.int64), want.to(torch.int64))


# ---- forward --------------------------------------------------------------------------------

SHAPES = [  # (M, K, N, group sizes that divide K)
    (1, 384, 384, (32, 64, 128, -1)),
    (3, 288, 17, (32, -1)),
    (17, 416, 1, (32, -1)),
    (33, 384, 17, (64, 128)),
    (1, 416, 384, (32,)),
    (1500, 96, 17, (32, -1)),
]
CASES = [(m, k, n, g) for m, k, n, gs in SHAPES for g in gs]


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group_size", CASES)
def test_forward_fp32_matches_reference(isa, m, k, n, group_size, bits, sym, path):
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(k, n, bits, group_size, sym, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) + 0.5
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits, group_size)
    ours = cpu.cpu_forward_packed(x, packed, bias, path=path)
    assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, bias, bits, n, weight_kn=path == "dequant")


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group_size", [(1, 384, 384, 128), (17, 288, 17, 32), (40, 416, 33, -1)])
def test_forward_bf16_within_twice_torch_error(isa, m, k, n, group_size, bits, path):
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(k, n, bits, group_size, sym=False, seed=k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) + 0.5).bfloat16()
    ours = cpu.cpu_forward_packed(x, cpu.repack_for_cpu(qweight, qzeros, scales, bits), bias, path=path)
    assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, bias, bits, n, weight_kn=path == "dequant")


@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("bits", [3, 4])
def test_long_rows_with_large_mean_activations(isa, bits, group_size):
    # K = 5120 (Whisper large fc2) with mean-3 inputs: a Σ x*q − z*Σx kernel had 300x torch's error here.
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(5120, 40, bits, group_size, sym=False)
    x = torch.randn(2, 5120, generator=torch.Generator().manual_seed(3)) + 3.0
    ours = cpu.cpu_forward_packed(x, cpu.repack_for_cpu(qweight, qzeros, scales, bits), bias, path="fused")
    assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, bias, bits, 40)


@pytest.mark.parametrize("m", [1, 4, 40])
def test_extreme_codes_and_zeros(isa, m):
    # Every code and zero value, including 15 / 7 in the top bits of a word (the sign bit).
    for bits in (3, 4):
        qweight, qzeros, scales, g_idx = random_gptq(128, 64, bits, 32, seed=bits)
        x = torch.randn(m, 128)
        ours = cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, None, bits, 64)
        assert_close_to_truth(ours, x, qweight, qzeros, scales, g_idx, None, bits, 64)
        full = torch.full_like(qweight, -1)  # all codes 2^bits - 1
        ours = cpu.cpu_forward(x, full, qzeros, scales, g_idx, None, bits, 64)
        assert_close_to_truth(ours, x, full, qzeros, scales, g_idx, None, bits, 64)


@pytest.mark.parametrize("m", [1, 40])
def test_3d_input_fp16_and_no_bias(m):
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(384, 17, 4, 128, sym=False)
    x = torch.randn(2, m, 384)
    y = cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, None, 4, 17)
    assert y.shape == (2, m, 17)
    assert_close_to_truth(y.reshape(-1, 17), x.reshape(-1, 384), qweight, qzeros, scales, g_idx, None, 4, 17)
    x16 = x.half()
    y16 = cpu.cpu_forward(x16, qweight, qzeros, scales, g_idx, bias, 4, 17)
    ref16 = reference_forward(x16, qweight, qzeros, scales, g_idx, bias, 4, 17)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16, ref16, atol=2e-3, rtol=2e-3)


def test_non_contiguous_and_empty_input():
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(288, 33, 3, 32, sym=False)
    x = torch.randn(288, 5).t()  # (5, 288), column-major
    assert_close_to_truth(cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, bias, 3, 33), x, qweight, qzeros,
                          scales, g_idx, bias, 3, 33)
    assert cpu.cpu_forward(torch.randn(0, 288), qweight, qzeros, scales, g_idx, bias, 3, 33).shape == (0, 33)


def test_gradient_with_respect_to_x():
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(384, 17, 4, 64, sym=False)
    x = torch.randn(3, 384, requires_grad=True)
    cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, bias, 4, 17).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference_forward(x_ref, qweight, qzeros, scales, g_idx, bias, 4, 17).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


# ---- registry, QuantLinear, cache -----------------------------------------------------------

def test_backend_is_registered_and_chosen_for_cpu():
    backend = BACKENDS["cpu"]
    assert backend.priority == 10 and backend.available and backend.why_unavailable == ""
    assert select_backend(1, 4, 128, "cpu").name == "cpu"
    assert select_backend(1, 3, 32, "cpu").name == "cpu"
    assert select_backend(1, 2, 128, "cpu").name == "torch"  # 2-bit is not a CPU kernel width


@pytest.mark.parametrize("bits", [3, 4])
def test_quant_linear_with_cpu_backend(bits):
    linear = torch.nn.Linear(384, 100)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=128, backend="cpu")
    x = torch.randn(2, 3, 384)
    ref = reference_forward(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, bits, 100)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_repack_cache_hits_and_invalidates_on_in_place_update():
    qweight, qzeros, scales, g_idx, bias, layer = make_layer(384, 64, 4, 128, sym=False)
    x = torch.randn(1, 384)
    y1 = cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, bias, 4, 64)
    packed = cpu._cached_repack(qweight, qzeros, scales, g_idx, 4)
    assert cpu._cached_repack(qweight, qzeros, scales, g_idx, 4) is packed  # hit: no second repack
    with torch.no_grad():
        scales.mul_(2)  # bumps the version counter: the next call must repack
    y2 = cpu.cpu_forward(x, qweight, qzeros, scales, g_idx, bias, 4, 64)
    assert cpu._cached_repack(qweight, qzeros, scales, g_idx, 4) is not packed
    torch.testing.assert_close(y2 - bias, 2 * (y1 - bias), atol=1e-5, rtol=1e-5)


# ---- error paths ----------------------------------------------------------------------------

def test_non_trivial_g_idx_is_rejected():
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(384, 17, 4, 128, sym=False)
    permuted = g_idx[torch.randperm(384, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match=r"g_idx must be the trivial arange\(K\) // group_size"):
        cpu.cpu_forward(torch.randn(1, 384), qweight, qzeros, scales, permuted, bias, 4, 17)
    with pytest.raises(ValueError, match=r"g_idx must have shape \[K=384\]"):
        cpu.cpu_forward(torch.randn(1, 384), qweight, qzeros, scales, g_idx[:100], bias, 4, 17)


def test_repack_argument_errors():
    qweight, qzeros, scales, _ = random_gptq(384, 40, 4, 128)
    with pytest.raises(ValueError, match=r"bits must be one of \(3, 4\)"):
        cpu.repack_for_cpu(qweight, qzeros, scales, 2)
    with pytest.raises(ValueError, match="qweight must be torch.int32"):
        cpu.repack_for_cpu(qweight.long(), qzeros, scales, 4)
    with pytest.raises(ValueError, match="scales must be torch.float16"):
        cpu.repack_for_cpu(qweight, qzeros, scales.float(), 4)
    with pytest.raises(ValueError, match="scales must have shape"):
        cpu.repack_for_cpu(qweight, qzeros, scales[:, :39], 4)
    with pytest.raises(ValueError, match=r"qzeros must have shape \[3, 8\] = \[G, pad32\(N\)\*bits/32\]"):
        cpu.repack_for_cpu(qweight, qzeros[:, :4], scales, 4)
    with pytest.raises(ValueError, match="group_size=64 is inconsistent with K=384"):
        cpu.repack_for_cpu(qweight, qzeros, scales, 4, group_size=64)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        cpu.repack_for_cpu(qweight[:47], qzeros, scales, 4)
    # K = 96 (12 words of 4-bit) with 5 groups, then with 2 groups of 48
    words, zeros = torch.zeros(12, 8, dtype=torch.int32), torch.zeros(5, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="scales has 5 groups, which does not divide K=96"):
        cpu.repack_for_cpu(words, zeros, torch.ones(5, 8, dtype=torch.float16), 4)
    with pytest.raises(ValueError, match="group_size must be a multiple of 32 for the CPU backend, got 48"):
        cpu.repack_for_cpu(words, zeros[:2], torch.ones(2, 8, dtype=torch.float16), 4)


def test_forward_argument_errors():
    qweight, qzeros, scales, g_idx, bias, _ = make_layer(384, 40, 4, 128, sym=False)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, 4)
    with pytest.raises(ValueError, match="x's last dimension must be in_features=384, got 383"):
        cpu.cpu_forward_packed(torch.randn(2, 383), packed, bias)
    with pytest.raises(ValueError, match="qweight has 40 columns but out_features=41"):
        cpu.cpu_forward(torch.randn(2, 384), qweight, qzeros, scales, g_idx, bias, 4, 41)
    args = (packed["words"], packed["scales"], packed["zeros"], packed["dsum"])
    C = cpu._C
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        C.qmatmul(torch.randn(2, 384, dtype=torch.float64), *args, bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[M, K\]"):
        C.qmatmul(torch.randn(1, 2, 384), *args, bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        C.qmatmul(torch.randn(384, 2).t(), *args, bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match=r"x.size\(1\) must equal in_features K=384, got 256"):
        C.qmatmul(torch.randn(2, 256), *args, bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[40\]"):
        C.qmatmul(torch.randn(2, 384), *args, bias[:39].contiguous(), 4, 128, 40)
    with pytest.raises(RuntimeError, match="bias must be Float, got Double"):
        C.qmatmul(torch.randn(2, 384), *args, bias.double(), 4, 128, 40)
    with pytest.raises(RuntimeError, match="words must be Int, got Long"):
        C.qmatmul(torch.randn(2, 384), args[0].long(), *args[1:], bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match="scales must be Half"):
        C.qmatmul(torch.randn(2, 384), args[0], args[1].float(), *args[2:], bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match="zeros must be Byte"):
        C.qmatmul(torch.randn(2, 384), *args[:2], args[2].int(), args[3], bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match="dsum must be Short"):
        C.qmatmul(torch.randn(2, 384), *args[:3], args[3].int(), bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match=r"dsum must have shape \[2, 3, 32\]"):
        C.qmatmul(torch.randn(2, 384), *args[:3], args[3][:, :2].contiguous(), bias, 4, 128, 40)
    with pytest.raises(RuntimeError, match="chunk_cols must be >= 0"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 128, 40, "dequant", 16, -1)
    with pytest.raises(RuntimeError, match=r"words must have shape \[ceil\(out_features/32\)=1"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 128, 32)
    with pytest.raises(RuntimeError, match="bits must be 3 or 4"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 8, 128, 40)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 32, got 48"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 48, 40)
    with pytest.raises(RuntimeError, match="group_size=256 must divide K=384"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 256, 40)
    with pytest.raises(RuntimeError, match=r"scales must have shape \[2, 6, 32\]"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 64, 40)
    with pytest.raises(RuntimeError, match="path must be 'auto', 'fused' or 'dequant', got 'fast'"):
        C.qmatmul(torch.randn(2, 384), *args, bias, 4, 128, 40, "fast")
    with pytest.raises(RuntimeError, match="isa must be one of"):
        C.set_isa("neon")


@pytest.mark.subprocess
def test_missing_extension_is_recorded_not_raised():
    # A fresh interpreter where fade_kernels._C cannot be imported (as in a pure-Python install).
    code = (
        "import sys; sys.modules['fade_kernels._C'] = None\n"
        "from fade_kernels.ops import cpu\n"
        "from fade_kernels.ops.registry import BACKENDS, select_backend\n"
        "ok, why = cpu.cpu_available(); assert not ok and 'not built' in why, why\n"
        "assert not BACKENDS['cpu'].available\n"
        "assert select_backend(1, 4, 128, 'cpu').name == 'torch'\n"
        "try:\n"
        "    select_backend(1, 4, 128, 'cpu', 'cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('explicit cpu backend must raise')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
