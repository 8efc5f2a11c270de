"""CPU int8-activation kernel (csrc/cpu/q8_*.cpp): layout, quantizer and error bound.

The kernel rounds each kernel group of x to int8 (scale s = max|x| / 127) and does the rest in
exact integers plus one fp32 multiply-add per group, so its output is checked two ways against
float64, on fresh random inputs (the seed is in every failure message):
  * against the float64 product of the *quantized* activations q * s and the same dequantized
    weight: at most twice torch's own fp32 error for that product, plus 4 units of fp32
    roundoff of |x_q| @ |W|^T (the per-group fp32 multiply-adds);
  * against the float64 product of the original x: additionally within the rounding bound
    |Δy_n| <= Σ_g s_g / 2 * Σ_{k in g} |W[n, k]|   (each |x - q*s| <= s/2).
Integers are bit-exact: the 3-bit repack round trip, the quantizer against its torch statement
(reference.quantize_activations_q8), and the outputs of the kernel families (AVX-512 VNNI, AVX2
with AVX-VNNI or vpmaddubsw, portable), which round in the same operations in the same order.
"""
from __future__ import annotations

import pytest
import torch

from fade_kernels.ops import cpu
from fade_kernels.ops.reference import dequantize_weight, quantize_activations_q8
from fade_kernels.packing import pack_qweight

from test_cpu_kernels import random_gptq  # arbitrary packed GPTQ weights

AVAILABLE, REASON = cpu.cpu_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU extension not built: {REASON}")

ISAS = cpu._C.supported_isas() if AVAILABLE else []


def fresh_seed() -> int:
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


def activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Non-zero-mean activations with a few large outlier channels and one all-zero group."""
    x = torch.randn(m, k, generator=gen) + 0.5
    x[:, torch.randint(0, k, (3,), generator=gen)] *= 20.0
    x[0, :32] = 0.0
    return x


def check_q8_output(y, x, qweight, qzeros, scales, g_idx, bias, bits, n, kernel_group, seed):
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, n).double()            # (N, K)
    m, k = x.shape
    q, s = quantize_activations_q8(x, kernel_group)
    xq = (q.double().reshape(m, -1, kernel_group) * s.double()[..., None]).reshape(m, k)
    b = 0 if bias is None else bias.double()
    truth_q = xq @ w.t() + b
    torch_err = (torch.nn.functional.linear(xq.float(), w.float(), None if bias is None else bias).double()
                 - truth_q).abs().max().item()
    atol = 4 * 2 ** -24 * (xq.abs() @ w.abs().t()).max().item()
    err_q = (y.double() - truth_q).abs().max().item()
    assert err_q <= 2 * torch_err + atol, f"seed {seed}: error {err_q:.3g} vs torch {torch_err:.3g} + {atol:.3g}"
    # The rounding bound against the original activations, per output.
    bound = ((s.double() / 2)[:, :, None] * w.abs().t().reshape(-1, kernel_group, n).sum(1)[None]).sum(1)  # (M, N)
    err = (y.double() - (x.double() @ w.t() + b)).abs()
    excess = (err - bound - (2 * torch_err + atol)).max().item()
    assert excess <= 0, f"seed {seed}: error exceeds the int8 rounding bound by {excess:.3g}"


# ---- layout and quantizer -------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(96, 1), (288, 17), (416, 40), (1536, 33)])
def test_3bit_q8_repack_round_trip_is_bit_exact(k, n):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k * 3 // 32, n), generator=gen, dtype=torch.int64).to(torch.int32)
    words = cpu.repack_q8_3bit(qweight)
    assert words.dtype == torch.int32 and words.shape == qweight.shape
    assert torch.equal(cpu.unpack_q8_3bit(words), qweight), f"seed {seed}"


def test_3bit_q8_layout_places_each_code():
    # One column, one run, code i = i % 8: spot-check the documented byte positions.
    codes = (torch.arange(32) % 8).reshape(1, 32).to(torch.int32)
    words = cpu.repack_q8_3bit(pack_qweight(codes, 3))[:, 0].to(torch.int64) & 0xFFFFFFFF
    byte = [(int(words[j // 4]) >> (8 * (j % 4))) & 0xFF for j in range(12)]
    for j in range(12):
        assert byte[j] & 7 == j % 8 and (byte[j] >> 3) & 7 == (12 + j) % 8
    for i in range(8):
        lo = byte[i] >> 6
        hi = (byte[8 + i % 4] >> (6 + i // 4)) & 1
        assert lo | (hi << 2) == (24 + i) % 8


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_quantizer_matches_torch_bit_exactly(group_size, dtype):
    seed = fresh_seed()
    x = activations(5, 384, torch.Generator().manual_seed(seed)).to(dtype)
    x[0, :group_size] = 0.0                                                            # an all-zero group
    x[1, 256:] = torch.tensor([0.5, -0.5, 1.5, -2.5, 2.5, 127.0, -3.5, 4.5] * 16).to(dtype)  # max 127: exact ties
    q, scale, total = cpu._C.quantize_activations_q8(x, group_size)
    q_ref, scale_ref = quantize_activations_q8(x, group_size)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref), f"seed {seed}"
    assert torch.equal(total, q_ref.reshape(5, -1, group_size).sum(-1, dtype=torch.int32)), f"seed {seed}"
    assert q[1, 256:264].tolist() == [0, 0, 2, -2, 2, 127, -4, 4]                      # half to even
    assert int(q.abs().max()) == 127 and scale[0, 0] == 0 and torch.all(q[0, :group_size] == 0)


# ---- forward --------------------------------------------------------------------------------

CASES = [  # (M, K, N, group size)
    (1, 384, 384, 128), (1, 1536, 100, 128), (1, 416, 40, 32), (1, 384, 17, -1),
    (3, 288, 17, 32), (3, 1536, 33, 64), (5, 416, 1, 32), (8, 384, 64, 64), (17, 288, 40, 32), (17, 384, 33, 128),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group_size", CASES)
def test_int8_forward_within_bound(isa, m, k, n, group_size, bits):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    qweight, qzeros, scales, g_idx = random_gptq(k, n, bits, gs, generator=gen)
    bias = torch.randn(n, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits, group_size)
    x = activations(m, k, gen)
    y = cpu.cpu_forward_packed(x, packed, bias, path="fused", activations="int8")
    assert y.dtype == torch.float32 and y.shape == (m, n)
    check_q8_output(y, x, qweight, qzeros, scales, g_idx, bias, bits, n, packed["kernel_group"], seed)


@pytest.mark.parametrize("bits", [3, 4])
def test_int8_forward_identical_across_kernel_families(bits):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, _ = random_gptq(416, 70, bits, 32, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    x, bias = activations(7, 416, gen), torch.randn(70, generator=gen)
    before, vnni = cpu._C.active_isa(), cpu._C.use_avxvnni(True)
    outs = {}
    try:
        for name in ISAS:
            cpu.set_isa(name)
            outs[name] = cpu.cpu_forward_packed(x, packed, bias, path="fused", activations="int8")
            if name == "avx2" and vnni:
                # The same family on vpmaddubsw, as CPUs without AVX-VNNI run it.
                cpu._C.use_avxvnni(False)
                outs["avx2-maddubs"] = cpu.cpu_forward_packed(x, packed, bias, path="fused", activations="int8")
                cpu._C.use_avxvnni(True)
    finally:
        cpu.set_isa(before)
    first = outs[ISAS[0]]
    for name, y in outs.items():
        assert torch.equal(y, first), f"seed {seed}: {name} differs from {ISAS[0]}"


@pytest.mark.parametrize("bits", [3, 4])
def test_int8_forward_bf16_and_fp16_activations(isa, bits):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = random_gptq(384, 40, bits, 128, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    x = activations(3, 384, gen)
    y32 = cpu.cpu_forward_packed(x.bfloat16().float(), packed, activations="int8")
    y16 = cpu.cpu_forward_packed(x.bfloat16(), packed, activations="int8")
    assert y16.dtype == torch.bfloat16
    # The kernel computes in fp32 from the same (exactly converted) inputs; bf16 rounds the output once.
    assert torch.equal(y16, y32.bfloat16()), f"seed {seed}"
    yh = cpu.cpu_forward_packed(x.half(), packed, activations="int8")
    assert yh.dtype == torch.float16 and torch.equal(yh, cpu.cpu_forward_packed(x.half().float(), packed,
                                                                                  activations="int8").half())


def test_auto_mode_picks_int8_only_for_small_m_where_it_runs_as_simd(monkeypatch):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, _ = random_gptq(384, 64, 4, 128, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, 4)
    monkeypatch.setattr(cpu, "INT8_MAX_M", 4)
    for m in (1, 4, 5):
        x = activations(m, 384, gen)
        auto = cpu.cpu_forward_packed(x, packed, path="fused", activations="auto")
        want = "int8" if cpu.int8_native() and m <= 4 else "fp32"
        assert torch.equal(auto, cpu.cpu_forward_packed(x, packed, path="fused", activations=want)), f"seed {seed}"
    # The module default (FADE_CPU_ACTIVATIONS) applies when no mode is passed.
    monkeypatch.setattr(cpu, "ACTIVATIONS", "fp32")
    x = activations(1, 384, gen)
    assert torch.equal(cpu.cpu_forward_packed(x, packed), cpu.cpu_forward_packed(x, packed, activations="fp32"))
    with pytest.raises(ValueError, match=r"activations must be one of \('auto', 'int8', 'fp32'\) or None"):
        cpu.cpu_forward_packed(x, packed, activations="int4")


@pytest.mark.skipif(AVAILABLE and not cpu.int8_native(), reason="auto keeps fp32 activations without SIMD int8")
@pytest.mark.parametrize("bits", [3, 4])
def test_auto_batch_rows_match_one_row_at_a_time(bits):
    # A batch of decoder rows (up to INT8_MAX_M, past the fp32 fused/dense crossover) must get
    # the arithmetic of one utterance at a time, or greedy transcripts depend on the batch size.
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, _ = random_gptq(512, 96, bits, 128, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    bias = torch.randn(96, generator=gen)
    rows = sorted({2, min(cpu.fused_max_m(torch.float32) + 1, cpu.INT8_MAX_M), cpu.INT8_MAX_M})
    for m in rows:
        assert cpu.auto_kernel(m, torch.float32) == "int8"
        x = activations(m, 512, gen)
        batch = cpu.cpu_forward_packed(x, packed, bias)
        one_by_one = torch.cat([cpu.cpu_forward_packed(x[i:i + 1], packed, bias) for i in range(m)])
        assert torch.equal(batch, one_by_one), f"seed {seed}, M = {m}"
    assert cpu.auto_kernel(cpu.INT8_MAX_M + 1, torch.float32) in ("fp32", "dense")


def test_auto_kernel_names_the_path_cpu_forward_takes(monkeypatch):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = random_gptq(256, 40, 4, 128, generator=gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, 4)
    dense = dequantize_weight(qweight, qzeros, scales, g_idx, 4, 40)
    monkeypatch.setattr(cpu, "FUSED_MAX_M", 3)
    monkeypatch.setattr(cpu, "INT8_MAX_M", 6)
    for m in (1, 3, 4, 6, 7):
        x = activations(m, 256, gen)
        kernel = cpu.auto_kernel(m, torch.float32)
        # "dense" is F.linear on the exactly dequantized weight (the dense-weight cache).
        want_y = torch.nn.functional.linear(x, dense) if kernel == "dense" else \
            cpu.cpu_forward_packed(x, packed, path="fused", activations=kernel)
        assert torch.equal(cpu.cpu_forward_packed(x, packed), want_y), f"seed {seed}, M = {m}: {kernel}"
        want = ("int8" if m <= 6 else "dense") if cpu.int8_native() else ("fp32" if m <= 3 else "dense")
        assert kernel == want, f"M = {m}: {kernel}"


def test_quant_linear_uses_the_int8_kernel_for_decode_rows():
    from fade_kernels.nn.quant_linear import QuantLinear

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear.from_linear(torch.nn.Linear(384, 72), bits=4, group_size=128)
    packed = cpu.repack_for_cpu(layer.qweight, layer.qzeros, layer.scales, 4)
    x = activations(1, 384, gen)
    with torch.no_grad():
        want = "int8" if cpu.int8_native() and cpu.ACTIVATIONS == "auto" else cpu.ACTIVATIONS
        if want == "auto":
            want = "fp32"
        expected = cpu.cpu_forward_packed(x, packed, layer.bias, activations=want)
        assert torch.equal(layer(x), expected), f"seed {seed}"
