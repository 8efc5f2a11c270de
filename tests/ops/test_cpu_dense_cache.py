"""The CPU backend's large-M dense-weight cache (fade_kernels.ops.cpu.DENSE_CACHE_BYTES).

With the cache, a large-M call is exactly F.linear on the dequantized weight (bit-identical to
torch's own dense GEMM on the reference weight); past the budget it falls back to dequant + GEMM;
the bytes it holds are returned when the layer's repack is freed.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from fade_kernels.ops import cpu
from fade_kernels.ops.reference import dequantize_weight
from fade_kernels.packing import pack_qweight, pack_qzeros

AVAILABLE, REASON = cpu.cpu_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU extension not built: {REASON}")


# The crossover to the dense path depends on the CPU (Intel: M > 64; elsewhere the fused kernel
# takes every M). Pin it so the dense path is what these tests exercise on any machine.
SMALL_CROSSOVER = 4


@pytest.fixture(autouse=True)
def small_crossover(monkeypatch):
    monkeypatch.setattr(cpu, "FUSED_MAX_M", SMALL_CROSSOVER)
    monkeypatch.setattr(cpu, "FUSED_MAX_M_BF16", SMALL_CROSSOVER)
    monkeypatch.setattr(cpu, "INT8_MAX_M", SMALL_CROSSOVER)


def layer(k, n, bits, group_size, gen):
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2 ** bits, (n, k // group_size), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.1 + 1e-3).half()
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    return pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
def test_large_m_is_the_dense_gemm_on_the_cached_weight(bits, dtype):
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = layer(288, 70, bits, 32, gen)
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, bits)
    bias = torch.randn(70, generator=gen)
    x = torch.randn(cpu.fused_max_m(dtype) + 1, 288, generator=gen).to(dtype)
    y = cpu.cpu_forward_packed(x, packed, bias)
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, 70).to(dtype)
    assert packed["dense"].dtype == dtype and torch.equal(packed["dense"], w), f"seed {seed}"
    assert torch.equal(y, F.linear(x, w, bias.to(dtype))), f"seed {seed}"
    assert torch.equal(cpu.cpu_forward_packed(x, packed, bias), y)  # the second call reuses it


def test_budget_is_respected_and_bytes_are_returned(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    qweight, qzeros, scales, _ = layer(256, 64, 4, 128, gen)
    x = torch.randn(cpu.fused_max_m(torch.float32) + 1, 256, generator=gen)
    gc.collect()  # layers of earlier tests still waiting for collection would return bytes mid-test
    before = cpu._DENSE_CACHED[0]
    monkeypatch.setattr(cpu, "DENSE_CACHE_BYTES", before + 256 * 64 * 4 - 1)  # one byte short
    packed = cpu.repack_for_cpu(qweight, qzeros, scales, 4)
    y = cpu.cpu_forward_packed(x, packed)
    assert "dense" not in packed and cpu._DENSE_CACHED[0] == before
    assert torch.equal(y, cpu.cpu_forward_packed(x, packed, path="dequant"))
    monkeypatch.setattr(cpu, "DENSE_CACHE_BYTES", before + 256 * 64 * 4)
    cpu.cpu_forward_packed(x, packed)
    assert "dense" in packed and cpu._DENSE_CACHED[0] == before + 256 * 64 * 4
    del packed
    gc.collect()
    assert cpu._DENSE_CACHED[0] == before
