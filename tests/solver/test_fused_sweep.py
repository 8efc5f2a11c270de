"""The fused C++ GPTQ sweep (csrc/cpu/gptq_sweep.cpp) against the torch loop: bit-exact.

Codes, scales, zeros, the per-row loss and the lazily updated weights must be identical, not
close: the kernel performs the torch loop's float32 operations in the same order.
"""
import pytest
import torch

from fade_kernels.solver import gptq
from fade_kernels.solver.gptq import (StaticGrids, gptq_quantize, gptq_quantize_shared, gptq_sweep,
                                      inverse_cholesky_upper)
from fade_kernels.solver.rtn import rtn_quantize

available, why = gptq.cpp_sweep_available()
pytestmark = pytest.mark.skipif(not available, reason=f"fused C++ sweep not built: {why}")

def supported_isas():
    from fade_kernels import _C

    best = _C.gptq_sweep_best_isa()
    return {"avx512": ["avx512", "avx2", "generic"], "avx2": ["avx2", "generic"], "generic": ["generic"]}[best]


def random_problem(n, k, gen, scale=1.0):
    """weight float32 (N, K) and a correlated-input Hessian float32 (K, K)."""
    weight = torch.randn(n, k, generator=gen) * scale
    mixing = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = mixing @ torch.randn(k, 2 * k, generator=gen) + 0.3 * torch.randn(k, 1, generator=gen)
    return weight, x @ x.t() / x.shape[1]


def assert_same_result(a, b):
    assert torch.equal(a.codes, b.codes), f"{int((a.codes != b.codes).sum())} codes differ"
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert a.loss == b.loss


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size,k", [(32, 160), (64, 256), (128, 256), (-1, 288)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_quantize_cpp_equals_torch(bits, sym, group_size, k, act_order, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    n = [1, 17, 33, 70][_fresh_seed % 4]  # awkward row counts: a partial last tile of 32 rows
    weight, hessian = random_problem(n, k, gen)
    kwargs = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    assert_same_result(gptq_quantize(weight, hessian, sweep="cpp", **kwargs),
                       gptq_quantize(weight, hessian, sweep="torch", **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("block_size,group_size",
                         [(1, 32), (5, 32), (7, -1), (32, 128), (48, 32), (128, 64), (300, 32)])
def test_blocks_not_aligned_with_groups(block_size, group_size, _fresh_seed):
    # Groups that start inside a block and run past it read columns beyond the block; groups
    # entered in an earlier block are continued in the next one.
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight, hessian = random_problem(35, 256, gen)
    kwargs = dict(bits=3, group_size=group_size, block_size=block_size)
    assert_same_result(gptq_quantize(weight, hessian, sweep="cpp", **kwargs),
                       gptq_quantize(weight, hessian, sweep="torch", **kwargs))


@pytest.mark.parametrize("bits", [2, 8])
def test_two_and_eight_bits(bits, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight, hessian = random_problem(40, 128, gen)
    for sym in (False, True):
        kwargs = dict(bits=bits, group_size=32, sym=sym)
        assert_same_result(gptq_quantize(weight, hessian, sweep="cpp", **kwargs),
                           gptq_quantize(weight, hessian, sweep="torch", **kwargs))


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 3e4])
def test_extreme_magnitudes(scale, _fresh_seed):
    # 1e-7: scales in float16's subnormal range and at its 2^-24 floor; 3e4: scales near the
    # float16 maximum, where its spacing is 8 and rounding up matters most.
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight, hessian = random_problem(33, 128, gen, scale)
    weight[3] = 0.0          # an all-zero row: scale 1
    hessian[7, :] = 0.0      # a dead input
    hessian[:, 7] = 0.0
    for sym in (False, True):
        kwargs = dict(bits=4, group_size=32, sym=sym)
        assert_same_result(gptq_quantize(weight, hessian, sweep="cpp", **kwargs),
                           gptq_quantize(weight, hessian, sweep="torch", **kwargs))


def test_rounding_ties_go_to_even():
    # Identity Hessian: GPTQ is RTN. Weights on exact half steps of a scale-1 grid (max 15, min
    # 0) make every w / s a tie, which torch.round sends to the even neighbour.
    weight = (torch.arange(32 * 64) % 30).float().reshape(32, 64) * 0.5
    weight[:, ::32] = 15.0
    weight[:, 1::32] = 0.0
    result = gptq_quantize(weight, torch.eye(64), bits=4, group_size=32, sweep="cpp")
    codes, scales, zeros = rtn_quantize(weight, 4, 32)
    assert torch.equal(scales, torch.ones_like(scales))
    assert torch.equal(result.codes, codes) and torch.equal(result.zeros, zeros)


def test_every_isa_and_the_updated_weights(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight, hessian = random_problem(45, 192, gen)
    U = inverse_cholesky_upper(hessian, 0.01)
    W_ref = weight.clone()
    ref = gptq_sweep(W_ref, U, 4, 64, block_size=64, impl="torch")
    for isa in supported_isas():
        W = weight.clone()
        out = gptq_sweep(W, U, 4, 64, block_size=64, impl="cpp", isa=isa)
        for name, a, b in zip(ref._fields, out, ref):
            assert torch.equal(a, b), f"isa={isa}: {name} differs"
        assert torch.equal(W, W_ref), f"isa={isa}: lazily updated weights differ"


def test_static_grids_are_read_not_written(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight, hessian = random_problem(20, 128, gen)
    perm = torch.randperm(128, generator=gen)
    _, scales, zeros = rtn_quantize(weight, 3, 32)
    grids = StaticGrids(scales, zeros.float(), perm // 32)
    U = inverse_cholesky_upper(hessian[perm][:, perm], 0.01)
    ref = gptq_sweep(weight[:, perm].contiguous(), U, 3, 32, static_grids=grids, impl="torch")
    out = gptq_sweep(weight[:, perm].contiguous(), U, 3, 32, static_grids=grids, impl="cpp")
    assert torch.equal(out.codes, ref.codes) and torch.equal(out.loss, ref.loss)
    assert torch.equal(out.scales, scales) and torch.equal(out.zeros, zeros.float())


def test_shared_input_stack(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    q, hessian = random_problem(24, 128, gen)
    k, v = torch.randn(8, 128, generator=gen), torch.randn(40, 128, generator=gen)
    fused = gptq_quantize_shared([q, k, v], hessian, bits=3, group_size=32, sweep="cpp")
    for weight, joint in zip((q, k, v), fused):
        alone = gptq_quantize(weight, hessian, bits=3, group_size=32, sweep="torch")
        assert torch.equal(joint.codes, alone.codes) and torch.equal(joint.scales, alone.scales)


def test_auto_picks_cpp_on_cpu(monkeypatch):
    calls = []
    original = gptq.sweep_block_cpp
    monkeypatch.setattr(gptq, "sweep_block_cpp", lambda *a, **k: calls.append(1) or original(*a, **k))
    gptq_quantize(torch.randn(4, 64), torch.eye(64), group_size=32)
    assert calls


def test_bad_arguments():
    with pytest.raises(ValueError, match="sweep must be one of"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), sweep="cuda")
    with pytest.raises(ValueError, match="factor must be one of"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), factor="lu")
    with pytest.raises(ValueError, match="impl must be 'torch', 'cpp' or 'triton'"):
        gptq_sweep(torch.randn(4, 64), torch.eye(64), 4, 32, impl="cuda")
    with pytest.raises(ValueError, match=r"U must be float32 \(64, 64\)"):
        gptq_sweep(torch.randn(4, 64), torch.eye(32), 4, 32, impl="cpp")
    with pytest.raises(ValueError, match="static_grids scales/zeros must have shape"):
        gptq_sweep(torch.randn(4, 64), torch.eye(64), 4, 32, impl="cpp",
                   static_grids=StaticGrids(torch.ones(4, 3), torch.ones(4, 3), torch.zeros(64, dtype=torch.long)))


def test_binding_checks_name_the_argument():
    from fade_kernels import _C

    W, U = torch.randn(4, 64), torch.eye(64)
    out = dict(scales=torch.zeros(4, 2), zeros=torch.zeros(4, 2), codes=torch.zeros(4, 64, dtype=torch.int32),
               err=torch.zeros(4, 32), loss=torch.zeros(4))

    def call(**overrides):
        args = dict(W=W, U=U, i1=0, i2=32, bits=4, sym=False, group_size=32, g_idx=None, **out)
        args.update(overrides)
        _C.gptq_sweep_block(**args)

    call()  # the valid call runs
    with pytest.raises(RuntimeError, match="W must be Float"):
        call(W=W.double())
    with pytest.raises(RuntimeError, match="U must have unit column stride"):
        call(U=U.t().contiguous().t())
    with pytest.raises(RuntimeError, match=r"the block \[i1, i2\) must satisfy"):
        call(i2=65)
    with pytest.raises(RuntimeError, match=r"err must have shape \[4, i2-i1=16\]"):
        call(i2=16)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8"):
        call(bits=5)
    with pytest.raises(RuntimeError, match="group_size must be positive and divide K=64"):
        call(group_size=48)
    with pytest.raises(RuntimeError, match=r"g_idx\[i1:i2\] must lie in \[0, K/group_size=2\)"):
        call(g_idx=torch.full((64,), 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="isa must be 'auto', 'avx512', 'avx2' or 'generic'"):
        _C.gptq_sweep_block(W, U, 0, 32, 4, False, 32, None, isa="neon", **out)
