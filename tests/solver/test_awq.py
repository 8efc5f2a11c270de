"""AWQ properties that can fail: Gram loss vs explicit X, b = 0 is RTN, salient channels,
never worse than RTN, clip, LayerNorm folding, the GPTQ variant, argument errors."""
import pytest
import torch
from torch import nn

from fade_kernels.solver.awq import (CLIP_RATIOS, awq_quantize, awq_scales, awq_search,
                                     fold_input_scale_into_layernorm, gram_loss)
from fade_kernels.solver.rtn import rtn_quantize


def gen(seed):
    return torch.Generator().manual_seed(seed)


def salient_problem(seed, n=64, k=256, tokens=1024, n_salient=6, correlated=False, dtype=torch.float32):
    """W (N, K), X (K, T) with a few input channels 20x louder than the rest, like LLM/ASR outliers."""
    g = gen(seed)
    x = torch.randn(k, tokens, generator=g, dtype=torch.float64)
    if correlated:
        mixing = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
        x = mixing @ x + 0.5 * torch.randn(k, 1, generator=g, dtype=torch.float64)
    x[torch.randperm(k, generator=g)[:n_salient]] *= 20.0
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    return w.to(dtype), x.to(dtype)


def stats(x):
    """H = X X^T / T (K, K) and mean |x_k| (K,), float32 like the pipeline's accumulators."""
    return (x @ x.t() / x.shape[1]).float(), x.abs().mean(1).float()


def dequant_unscaled(codes, scales, zeros, input_scale):
    """W_hat = W_q diag(1/s), float64 (N, K)."""
    g = codes.shape[1] // scales.shape[1]
    w_q = (codes.double() - zeros.double().repeat_interleave(g, 1)) * scales.double().repeat_interleave(g, 1)
    return w_q / input_scale.double()


def direct_loss(w, w_hat, x):
    """||(W - W_hat) X||^2 / T in float64."""
    return float((((w.double() - w_hat) @ x.double()) ** 2).sum() / x.shape[1])


def test_gram_loss_equals_direct_output_error_float64():
    w, x = salient_problem(0, dtype=torch.float64)
    w_hat = w + 0.01 * torch.randn(w.shape, generator=gen(1), dtype=torch.float64)
    hessian = x @ x.t() / x.shape[1]
    assert float(gram_loss(w - w_hat, hessian)) == pytest.approx(direct_loss(w, w_hat, x), rel=1e-10)


@pytest.mark.parametrize("solver,clip", [("rtn", False), ("rtn", True), ("gptq", False)])
def test_reported_loss_is_the_output_error_of_the_returned_codes(solver, clip):
    w, x = salient_problem(2, correlated=True)
    hessian, act = stats(x.double())
    codes, scales, zeros, s, res = awq_quantize(w, hessian, act, 4, 64, False, 10, clip, solver=solver)
    direct = direct_loss(w, dequant_unscaled(codes, scales, zeros, s), x)
    # float32 Gram arithmetic against a float64 product over explicit X.
    assert res.loss_final == pytest.approx(direct, rel=1e-4)
    if solver == "rtn":
        assert res.loss_final == pytest.approx(res.loss_awq, rel=1e-6)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (3, 32, False), (4, -1, True), (2, 64, False), (8, 64, True)])
def test_beta_zero_reproduces_rtn_exactly(bits, group_size, sym):
    w, x = salient_problem(3)
    hessian, act = stats(x)
    codes, scales, zeros, s, res = awq_quantize(w, hessian, act, bits, group_size, sym, n_grid=1, clip=False)
    rtn_codes, rtn_scales, rtn_zeros = rtn_quantize(w, bits, group_size, sym)
    assert res.beta == 0.0 and torch.equal(s, torch.ones(256))
    assert torch.equal(codes, rtn_codes) and torch.equal(scales, rtn_scales) and torch.equal(zeros, rtn_zeros)
    assert res.loss_awq == res.loss_rtn
    assert res.loss_rtn == pytest.approx(direct_loss(w, dequant_unscaled(rtn_codes, rtn_scales, rtn_zeros, s), x), rel=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_salient_channels(bits):
    w, x = salient_problem(4 + bits)
    hessian, act = stats(x)
    res = awq_search(w, hessian, act, bits, 128, False, n_grid=20, clip=False)
    assert 0.0 < res.beta < 1.0
    # Measured ~0.4 on this construction; RTN wastes the salient channels' precision.
    assert res.loss_awq < 0.6 * res.loss_rtn
    assert res.grid_losses.shape == (20,) and float(res.grid_losses[0]) == res.loss_rtn
    assert float(res.grid_losses.min()) == res.loss_awq
    # The scaled-up channels are the loud ones.
    assert set(torch.topk(res.input_scale, 6).indices.tolist()) == set(torch.topk(act, 6).indices.tolist())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("clip", [False, True])
def test_awq_never_worse_than_rtn(seed, clip):
    g = gen(100 + seed)
    k = 128
    x = torch.randn(k, 512, generator=g) * torch.rand(k, 1, generator=g)  # mild, varied channel scales
    if seed % 2:
        x = (torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)) @ x
    w = torch.randn(48, k, generator=g) * torch.rand(1, k, generator=g) * 3
    hessian, act = stats(x)
    res = awq_search(w, hessian, act, [2, 3, 4][seed % 3], [32, 64, -1][seed % 3], seed % 4 == 0, 8, clip)
    assert res.loss_awq <= res.loss_rtn
    if not clip:
        assert res.clip_ratios is None


def test_equal_activations_keep_rtn():
    # All channels equally loud: every exponent gives s = 1, so the tie goes to b = 0.
    w, x = salient_problem(5, n_salient=0)
    hessian, _ = stats(x)
    res = awq_search(w, hessian, torch.full((256,), 0.7), 4, 128, False, 10, clip=False)
    assert res.beta == 0.0 and torch.equal(res.input_scale, torch.ones(256))


def test_scales_are_normalised_and_float16_exact():
    act = torch.rand(256, generator=gen(6)) * 10
    act[:3] = 0.0  # dead channels are floored, not divided by
    s = awq_scales(act, 0.6)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert torch.equal(s, s.half().float())
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=2e-3)  # float16 rounding
    assert torch.equal(awq_scales(act, 0.0), torch.ones(256))


def test_dead_channels_stay_finite():
    w, x = salient_problem(7)
    x[10:20] = 0.0
    hessian, act = stats(x)
    codes, scales, zeros, s, res = awq_quantize(w, hessian, act, 3, 64, False, 10, True)
    assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(scales).all())
    assert res.loss_awq <= res.loss_rtn
    assert int(codes.min()) >= 0 and int(codes.max()) <= 7


@pytest.mark.slow
def test_clip_helps_and_ratios_come_from_the_grid():
    w, x = salient_problem(8)
    hessian, act = stats(x)
    plain = awq_search(w, hessian, act, 3, 128, False, 20, clip=False)
    clipped = awq_search(w, hessian, act, 3, 128, False, 20, clip=True)
    assert clipped.beta == plain.beta and torch.equal(clipped.input_scale, plain.input_scale)
    # Measured ~0.8 on this construction (3-bit, gaussian weights have long tails per group).
    assert clipped.loss_awq < 0.95 * plain.loss_awq
    assert clipped.clip_ratios.shape == (64, 2)
    assert set(clipped.clip_ratios.unique().tolist()) <= set(torch.tensor(CLIP_RATIOS).tolist())
    assert float(clipped.clip_ratios.min()) < 1.0


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_variant_beats_awq_rtn_on_correlated_inputs(bits):
    # On correlated inputs GPTQ's error feedback removes much more than the clip does. (On
    # independent inputs, a near-diagonal H, AWQ-RTN with clip can beat AWQ-GPTQ at 3 bits:
    # GPTQ then has nothing to compensate with, and it chooses plain min/max grids.)
    w, x = salient_problem(9 + bits, correlated=True)
    hessian, act = stats(x)
    *_, rtn = awq_quantize(w, hessian, act, bits, 128, False, 20, clip=True, solver="rtn")
    codes, scales, zeros, s, gptq = awq_quantize(w, hessian, act, bits, 128, False, 20, solver="gptq", act_order=True)
    assert gptq.clip_ratios is None and torch.equal(s, rtn.input_scale)
    assert gptq.loss_final < 0.9 * rtn.loss_final
    assert gptq.loss_final < gptq.loss_rtn


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_layernorm_preserves_outputs(dtype, atol, bias):
    torch.manual_seed(10)
    k = 96
    norm = nn.LayerNorm(k, bias=bias).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if bias:
            norm.bias.normal_()
    linears = [nn.Linear(k, n, bias=b).to(dtype) for n, b in ((96, True), (48, False), (96, True))]
    x = torch.randn(5, 7, k, dtype=dtype) * 3
    before = [lin(norm(x)) for lin in linears]
    weights = [lin.weight.detach().clone() for lin in linears]
    s = awq_scales(torch.rand(k, generator=gen(11)) ** 4 * 10, 0.8)  # a wide spread of scales
    fold_input_scale_into_layernorm(norm, linears, s)
    after = [lin(norm(x)) for lin in linears]
    for b, a, w0, lin in zip(before, after, weights, linears):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
        assert torch.equal(lin.weight, w0 * s.to(dtype))


def test_folded_weights_are_what_awq_quantized():
    # The pipeline folds s into the norm and swaps in codes of W diag(s): those must be RTN of
    # the folded float weight, bit for bit.
    w, x = salient_problem(12, n=96, k=128)
    hessian, act = stats(x)
    codes, scales, zeros, s, _ = awq_quantize(w, hessian, act, 4, 32, False, 10, clip=False)
    norm, lin = nn.LayerNorm(128), nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fold_input_scale_into_layernorm(norm, [lin], s)
    ref = rtn_quantize(lin.weight.detach(), 4, 32)
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]) and torch.equal(zeros, ref[2])


def test_bad_arguments_raise():
    w, x = salient_problem(13, n=8, k=64, tokens=128)
    h, a = stats(x)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        awq_search(w[0], h, a)
    with pytest.raises(ValueError, match=r"hessian must have shape \(64, 64\)"):
        awq_search(w, h[:32, :32], a, group_size=32)
    with pytest.raises(ValueError, match=r"act_mean_abs must have shape \(64,\)"):
        awq_search(w, h, a[:32], group_size=32)
    with pytest.raises(ValueError, match="act_mean_abs must be finite and >= 0"):
        awq_search(w, h, -a, group_size=32)
    for n_grid in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_grid must be a positive integer"):
            awq_search(w, h, a, group_size=32, n_grid=n_grid)
    with pytest.raises(ValueError, match="bits must be one of"):
        awq_search(w, h, a, bits=5, group_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        awq_search(w, h, a, group_size=128)
    with pytest.raises(ValueError, match="solver must be 'rtn' or 'gptq'"):
        awq_quantize(w, h, a, group_size=32, solver="awq")
    with pytest.raises(ValueError, match="GPTQ options"):
        awq_quantize(w, h, a, group_size=32, solver="rtn", act_order=True)
    norm, lin = nn.LayerNorm(64), nn.Linear(32, 8)
    with pytest.raises(ValueError, match="in_features=32"):
        fold_input_scale_into_layernorm(norm, [lin], torch.ones(64))
    with pytest.raises(ValueError, match=r"input_scale must have shape \(64,\)"):
        fold_input_scale_into_layernorm(norm, [nn.Linear(64, 8)], torch.ones(32))
    with pytest.raises(ValueError, match="input_scale must be finite and > 0"):
        fold_input_scale_into_layernorm(norm, [nn.Linear(64, 8)], torch.zeros(64))
    with pytest.raises(ValueError, match="affine weight"):
        fold_input_scale_into_layernorm(nn.LayerNorm(64, elementwise_affine=False), [nn.Linear(64, 8)], torch.ones(64))
