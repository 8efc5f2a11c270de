"""GPTQ properties that can fail: identity Hessian, error vs RTN, stacking, act-order, float64."""
import pytest
import torch

from fade_kernels.solver.gptq import gptq_quantize, gptq_quantize_shared, prepare_gptq_factor
from fade_kernels.solver.grid import compute_grid, dequantize_codes, quantize_to_codes
from fade_kernels.solver.rtn import rtn_quantize


def dequant(codes, scales, zeros):
    g = codes.shape[1] // scales.shape[1]
    return dequantize_codes(codes, scales.repeat_interleave(g, 1), zeros.repeat_interleave(g, 1).float())


def correlated_inputs(k: int, tokens: int) -> torch.Tensor:
    """X (K, T) with strongly correlated features, like real activations."""
    mixing = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    return mixing @ torch.randn(k, tokens) + 0.5 * torch.randn(k, 1)


def output_error(weight, weight_hat, x):
    return float(((weight - weight_hat) @ x).norm() / (weight @ x).norm())


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (3, 32, False), (4, -1, True), (2, 64, False)])
def test_identity_hessian_equals_rtn_exactly(bits, group_size, sym):
    weight = torch.randn(24, 256)
    result = gptq_quantize(weight, torch.eye(256), bits=bits, group_size=group_size, sym=sym)
    codes, scales, zeros = rtn_quantize(weight, bits, group_size, sym)
    assert torch.equal(result.codes, codes)
    assert torch.equal(result.scales, scales)
    assert torch.equal(result.zeros, zeros)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    weight = torch.randn(64, 256)
    x = correlated_inputs(256, 2048)
    result = gptq_quantize(weight, x @ x.t() / x.shape[1], bits=bits, group_size=128, act_order=act_order)
    gptq_error = output_error(weight, dequant(result.codes, result.scales, result.zeros), x)
    rtn_error = output_error(weight, dequant(*rtn_quantize(weight, bits, 128)), x)
    assert gptq_error < 0.9 * rtn_error


def test_stacked_qkv_equals_three_separate_solves():
    x = correlated_inputs(128, 512)
    hessian = x @ x.t() / x.shape[1]
    q, k, v = torch.randn(64, 128), torch.randn(32, 128), torch.randn(96, 128)
    stacked = gptq_quantize_shared([q, k, v], hessian, bits=3, group_size=32, block_size=32)
    for weight, joint in zip((q, k, v), stacked):
        alone = gptq_quantize(weight, hessian, bits=3, group_size=32, block_size=32)
        assert torch.equal(joint.codes, alone.codes)
        assert torch.equal(joint.scales, alone.scales)
        assert torch.equal(joint.zeros, alone.zeros)


def test_act_order_on_diagonal_hessian_is_rtn_in_original_order():
    # A diagonal H couples no columns: whatever the visiting order, GPTQ must reproduce RTN
    # column for column, so any permutation bug shows up as moved codes.
    weight = torch.randn(16, 128)
    hessian = torch.diag(torch.rand(128) + 0.1)
    result = gptq_quantize(weight, hessian, bits=4, group_size=32, act_order=True)
    assert result.perm is not None and torch.equal(result.perm.sort().values, torch.arange(128))
    assert not torch.equal(result.perm, torch.arange(128))
    codes, scales, zeros = rtn_quantize(weight, 4, 32)
    assert torch.equal(result.codes, codes) and torch.equal(result.scales, scales)


def test_act_order_reconstruction_uses_original_groups():
    weight = torch.randn(32, 128)
    x = correlated_inputs(128, 1024)
    result = gptq_quantize(weight, x @ x.t() / 1024, bits=4, group_size=32, act_order=True)
    # Static groups: every group's grid is RTN's grid of the original weights.
    _, scales, zeros = rtn_quantize(weight, 4, 32)
    assert torch.equal(result.scales, scales) and torch.equal(result.zeros, zeros)
    assert output_error(weight, dequant(result.codes, result.scales, result.zeros), x) < 0.2


def naive_gptq_float64(weight, hessian, bits, damp):
    """GPTQ re-derived from the optimal brain surgeon update, in float64, one column at a time:
    quantize column i, push err * Hinv[i, j] / Hinv[i, i] onto later columns, then remove i
    from the inverse Hessian by a rank-1 downdate. One grid per row (group_size=-1)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    scales, zeros = compute_grid(weight, bits)
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        codes[:, i] = quantize_to_codes(w[:, i:i + 1].float(), scales, zeros, bits)[:, 0].double()
        err = (w[:, i] - (codes[:, i] - zeros[:, 0].double()) * scales[:, 0].double()) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes.int()


@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_matches_float64_rederivation(block_size):
    weight = torch.randn(8, 32)
    x = correlated_inputs(32, 256)
    hessian = x @ x.t() / 256
    result = gptq_quantize(weight, hessian, bits=3, group_size=-1, block_size=block_size)
    expected = naive_gptq_float64(weight, hessian, 3, 0.01)
    assert torch.equal(result.codes, expected)


def test_dead_inputs_are_zeroed():
    weight = torch.randn(8, 64)
    x = correlated_inputs(64, 256)
    x[5] = 0.0   # an input that is never active
    result = gptq_quantize(weight, x @ x.t() / 256, bits=4, group_size=32)
    w_hat = dequant(result.codes, result.scales, result.zeros)
    assert torch.all(w_hat[:, 5].abs() <= result.scales[:, 0] * 0.5 + 1e-7)


def test_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match=r"hessian must have shape \(64, 64\)"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(8, 288), torch.eye(288), group_size=128)


@pytest.mark.parametrize("act_order", [False, True])
def test_a_prepared_factor_gives_the_same_codes_for_every_weight_of_that_input(act_order):
    """One factor, several weights (FADE's two solves, cross k/v of every decoder block): the codes
    equal those of a solve that factors the Hessian itself, bit for bit, dead inputs included."""
    x = correlated_inputs(96, 400)
    x[7] = 0.0
    hessian = x @ x.t() / 400
    prepared = prepare_gptq_factor(hessian, damp=0.02, act_order=act_order)
    assert bool(prepared.dead[7]) and int(prepared.dead.sum()) == 1
    for _ in range(3):
        weight = torch.randn(24, 96)
        direct = gptq_quantize(weight, hessian, bits=3, group_size=32, act_order=act_order, damp=0.02)
        reused = gptq_quantize(weight, None, bits=3, group_size=32, act_order=act_order, damp=0.02, prepared=prepared)
        assert torch.equal(direct.codes, reused.codes) and torch.equal(direct.zeros, reused.zeros)
        assert torch.equal(direct.scales, reused.scales)


def test_a_prepared_factor_must_match_the_call():
    prepared = prepare_gptq_factor(torch.eye(64), damp=0.01, act_order=False)
    with pytest.raises(ValueError, match="act_order=False"):
        gptq_quantize(torch.randn(8, 64), None, act_order=True, prepared=prepared, group_size=32)
    with pytest.raises(ValueError, match="K = 64, but weight has K = 32"):
        gptq_quantize(torch.randn(8, 32), None, prepared=prepared, group_size=32)
    with pytest.raises(ValueError, match="needs a hessian"):
        gptq_quantize(torch.randn(8, 64), None, group_size=32)
