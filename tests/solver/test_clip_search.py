"""The clipping search of the grid (grid.compute_grid clip="mse"/"hessian") and its use by RTN
and GPTQ: the chosen grid is the float64 argmin over the shrink factors, never worse than
min-max, and the search runs in the torch sweep only (the fused sweeps refuse it, except with
act-order, whose static grids feed them bit-exactly)."""
from __future__ import annotations

import pytest
import torch

from fade_kernels.config import QuantConfig
from fade_kernels.solver.gptq import cpp_sweep_available, gptq_quantize
from fade_kernels.solver.grid import CLIP_SHRINK, compute_grid
from fade_kernels.solver.rtn import rtn_quantize


def _weights(n=48, g=64):
    # Heavy-tailed rows, as in real layers: a few outliers make min-max wasteful.
    return torch.randn(n, g) * (1 + 4 * (torch.rand(n, g) > 0.97))


def _error64(w, scales, zeros, bits, col=None):
    w = w.double()
    q = torch.clamp(torch.round(w / scales.double()) + zeros.double(), 0, 2 ** bits - 1)
    sq = (w - (q - zeros.double()) * scales.double()) ** 2
    return (sq if col is None else sq * col.double()).sum(1)


@pytest.mark.parametrize("bits,sym", [(3, False), (4, False), (3, True)])
@pytest.mark.parametrize("clip", ["mse", "hessian"])
def test_search_is_the_float64_argmin_and_beats_minmax(bits, sym, clip, _fresh_seed):
    w = _weights()
    col = torch.rand(w.shape[1]) * 3 if clip == "hessian" else None
    chosen = compute_grid(w, bits, sym, clip, col)
    base = compute_grid(w, bits, sym)
    err_chosen = _error64(w, chosen.scales, chosen.zeros, bits, col)
    err_minmax = _error64(w, base.scales, base.zeros, bits, col)
    assert (err_chosen <= err_minmax * (1 + 1e-6)).all(), f"seed {_fresh_seed}"
    # Brute force over the same candidates in float64 scoring: the pick is within float32
    # rounding of the best candidate's error.
    lo = w.abs().amax(1, keepdim=True) * -1 if sym else w.amin(1, keepdim=True).clamp(max=0)
    hi = w.abs().amax(1, keepdim=True) if sym else w.amax(1, keepdim=True).clamp(min=0)
    best = torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    for p in CLIP_SHRINK:
        # The min-max grid of [p lo, p hi] is the candidate of shrink factor p.
        cand = compute_grid(torch.cat([lo * p, hi * p], 1), bits, sym)
        best = torch.minimum(best, _error64(w, cand.scales, cand.zeros, bits, col))
    assert torch.allclose(err_chosen, best, rtol=1e-5, atol=1e-9), f"seed {_fresh_seed}"
    assert (err_chosen < err_minmax).any(), f"seed {_fresh_seed}: outlier rows should clip"


def test_minmax_is_unchanged_and_bad_clip_rejected():
    w = _weights()
    assert torch.equal(compute_grid(w, 3).scales, compute_grid(w, 3, clip="minmax").scales)
    with pytest.raises(ValueError, match="clip must be one of"):
        compute_grid(w, 3, clip="percentile")
    with pytest.raises(ValueError, match="column_weight"):
        compute_grid(w, 3, clip="hessian")
    with pytest.raises(ValueError, match="clip must be one of"):
        QuantConfig(clip="nope")


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "qep", "fade", "fade-rtn"])
def test_unset_clip_takes_the_method_default_and_a_given_one_wins(method):
    from fade_kernels.config import METHODS

    expected = "hessian" if method == "fade" else "minmax"
    assert METHODS[method].clip == expected
    config = QuantConfig(method=method)
    assert config.clip == expected and config.to_dict()["clip"] == expected     # recorded resolved
    assert QuantConfig(method=method, clip="mse").clip == "mse"
    assert QuantConfig(**QuantConfig(method=method).to_dict()) == config          # a saved config reloads equal


def _problem(n=64, k=256, t=512):
    w = torch.randn(n, k) * (1 + 3 * (torch.rand(n, k) > 0.98))
    x = torch.randn(k, t) * torch.rand(k, 1) * 2
    return w, x @ x.T / t


def _out_err(w, codes, scales, zeros, h, g):
    deq = (codes.float() - zeros.float().repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    d = (w - deq).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("clip", ["mse", "hessian"])
def test_rtn_and_gptq_search_lower_the_layer_error(clip, _fresh_seed):
    w, h = _problem()
    diag = torch.diagonal(h)
    rtn_base = _out_err(w, *rtn_quantize(w, 3, 64), h, 64)
    rtn_clip = _out_err(w, *rtn_quantize(w, 3, 64, clip=clip, hessian_diag=diag), h, 64)
    g_base = gptq_quantize(w, h, bits=3, group_size=64)
    g_clip = gptq_quantize(w, h, bits=3, group_size=64, clip=clip)
    assert rtn_clip < rtn_base, f"seed {_fresh_seed}"
    assert _out_err(w, g_clip.codes, g_clip.scales, g_clip.zeros, h, 64) < \
        _out_err(w, g_base.codes, g_base.scales, g_base.zeros, h, 64), f"seed {_fresh_seed}"


def test_rtn_search_matches_per_group_compute_grid():
    w, h = _problem()
    diag = torch.diagonal(h)
    codes, scales, zeros = rtn_quantize(w, 3, 64, clip="hessian", hessian_diag=diag)
    for j in range(0, w.shape[1], 64):
        grid = compute_grid(w[:, j:j + 64], 3, False, "hessian", diag[j:j + 64])
        assert torch.equal(scales[:, j // 64], grid.scales[:, 0])
        assert torch.equal(zeros[:, j // 64], grid.zeros[:, 0].to(torch.int32))


def test_gptq_search_runs_in_the_torch_sweep_only():
    w, h = _problem()
    auto = gptq_quantize(w, h, bits=3, group_size=64, clip="mse")
    torch_loop = gptq_quantize(w, h, bits=3, group_size=64, clip="mse", sweep="torch")
    assert torch.equal(auto.codes, torch_loop.codes) and torch.equal(auto.scales, torch_loop.scales)
    with pytest.raises(ValueError, match="needs sweep='torch'"):
        gptq_quantize(w, h, bits=3, group_size=64, clip="mse", sweep="cpp")


@pytest.mark.skipif(not cpp_sweep_available()[0], reason="fused C++ sweep not built")
@pytest.mark.parametrize("clip", ["mse", "hessian"])
def test_act_order_static_search_grids_are_bit_exact_across_sweeps(clip):
    w, h = _problem()
    ref = gptq_quantize(w, h, bits=3, group_size=64, act_order=True, clip=clip, sweep="torch")
    fused = gptq_quantize(w, h, bits=3, group_size=64, act_order=True, clip=clip, sweep="cpp")
    assert torch.equal(ref.codes, fused.codes)
    assert torch.equal(ref.scales, fused.scales) and torch.equal(ref.zeros, fused.zeros)
    base = gptq_quantize(w, h, bits=3, group_size=64, act_order=True)
    assert not torch.equal(ref.scales, base.scales)  # the search did change some grids


def test_act_order_static_search_grids_are_bit_exact_in_the_triton_sweep():
    pytest.importorskip("triton")
    w, h = _problem(n=24, k=128)
    ref = gptq_quantize(w, h, bits=3, group_size=32, act_order=True, block_size=64, clip="hessian", sweep="torch")
    got = gptq_quantize(w, h, bits=3, group_size=32, act_order=True, block_size=64, clip="hessian", sweep="triton")
    assert torch.equal(ref.codes, got.codes) and torch.equal(ref.scales, got.scales) and torch.equal(ref.zeros, got.zeros)
    with pytest.raises(ValueError, match="needs sweep='torch'"):
        gptq_quantize(w, h, bits=3, group_size=32, clip="hessian", sweep="triton")
