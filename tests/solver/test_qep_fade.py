"""QEP's correction and FADE's diagnostics against direct computations on explicit X, X-hat."""
import pytest
import torch

from fade_kernels.api import solve_linear_group
from fade_kernels.calib.statistics import GramAccumulator
from fade_kernels.config import QuantConfig
from fade_kernels.solver.fade import (ALPHA_GRID, GramStats, choose_alpha, cross_fitted_coefficients,
                                      evaluate_quadratic, grid_noise_curve, output_error_vs_full_precision,
                                      relative_output_error, residual_coefficients)
from fade_kernels.solver.grid import compute_grid
from fade_kernels.solver.qep import corrected_weight, qep_correction, ridge


def chains(tokens, width, generator, noise=0.3, dtype=torch.float32):
    """Correlated quantized-chain rows X-hat (T, K) and full-precision rows X = X-hat + delta,
    with delta partly a linear function of X-hat (learnable) plus independent noise."""
    mix = torch.randn(width, width, generator=generator, dtype=dtype) / width ** 0.5
    x_hat = torch.randn(tokens, width, generator=generator, dtype=dtype) @ (torch.eye(width, dtype=dtype) + mix)
    drift = 0.2 * torch.randn(width, width, generator=generator, dtype=dtype) / width ** 0.5
    delta = x_hat @ drift + noise * torch.randn(tokens, width, generator=generator, dtype=dtype)
    return x_hat, x_hat + delta


def gram(x_hat, x):
    delta = x - x_hat
    t = x_hat.shape[0]
    return GramStats(x_hat.t() @ x_hat / t, delta.t() @ x_hat / t, delta.t() @ delta / t, t)


@pytest.mark.parametrize("damp", [1e-3, 0.01, 1.0])
def test_qep_correction_is_the_float64_ridge_least_squares_minimiser(damp):
    generator = torch.Generator().manual_seed(int(damp * 1000) + 1)
    tokens, width, rows = 400, 24, 10
    x_hat, x = chains(tokens, width, generator, dtype=torch.float64)
    weight = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    stats = gram(x_hat, x)
    lam = ridge(stats.hessian, damp)
    # min_W' ||W X - W' X-hat||^2 + lam T ||W' - W||^2 as one least-squares problem in W'^T.
    design = torch.cat([x_hat, (lam * tokens) ** 0.5 * torch.eye(width, dtype=torch.float64)])
    target = torch.cat([x @ weight.t(), (lam * tokens) ** 0.5 * weight.t()])
    expected = torch.linalg.lstsq(design, target).solution.t()
    got = corrected_weight(weight.float(), qep_correction(weight.float(), stats.hessian.float(), stats.cross.float(), damp), 1.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_alpha_one_without_quantization_reproduces_the_least_squares_output():
    generator = torch.Generator().manual_seed(7)
    x_hat, x = chains(600, 16, generator, dtype=torch.float64)
    weight = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    stats = gram(x_hat, x)
    corrected = corrected_weight(weight.float(), qep_correction(weight.float(), stats.hessian.float(),
                                                                stats.cross.float(), damp=1e-6), 1.0).double()
    least_squares = torch.linalg.lstsq(x_hat, x @ weight.t()).solution.t()
    torch.testing.assert_close(x_hat @ corrected.t(), x_hat @ least_squares.t(), rtol=1e-3, atol=1e-3)
    # And it beats the uncorrected weight on the full-precision target.
    assert (x @ weight.t() - x_hat @ corrected.t()).norm() < 0.9 * (x @ weight.t() - x_hat @ weight.t()).norm()


def test_alpha_zero_reproduces_plain_gptq_bit_exactly():
    generator = torch.Generator().manual_seed(3)
    x_hat, x = chains(300, 64, generator)
    stats = gram(x_hat, x)
    weights = [torch.randn(n, 64, generator=generator) for n in (8, 16)]
    plain = solve_linear_group(weights, stats, QuantConfig(method="gptq", bits=3, group_size=32))
    qep0 = solve_linear_group(weights, stats, QuantConfig(method="qep", alpha=0.0, bits=3, group_size=32))
    for a, b in zip(plain, qep0):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_qep_excluded_layers_get_alpha_zero_and_others_the_global_alpha():
    generator = torch.Generator().manual_seed(4)
    x_hat, x = chains(300, 32, generator)
    weights = [torch.randn(8, 32, generator=generator) for _ in range(2)]
    out = solve_linear_group(weights, gram(x_hat, x), QuantConfig(method="qep", alpha=0.5, group_size=32),
                             excluded=[True, False])
    assert [s.alpha for s in out] == [0.0, 0.5]
    torch.testing.assert_close(out[0].target, weights[0])


def test_residual_and_noise_from_gram_matrices_equal_direct_computation():
    generator = torch.Generator().manual_seed(11)
    width, rows, group, bits = 64, 12, 32, 3
    x_hat_a, x_a = chains(250, width, generator)
    x_hat_b, x_b = chains(180, width, generator)
    weight = torch.randn(rows, width, generator=generator)
    stats_a, stats_b = gram(x_hat_a, x_a), gram(x_hat_b, x_b)
    correction_a = qep_correction(weight, stats_a.hessian, stats_a.cross, 0.1)
    coefficients = residual_coefficients(weight, correction_a, stats_b)
    for alpha in (0.0, 0.3, 1.0):
        direct = ((x_b - x_hat_b).double() @ weight.t().double()
                  - alpha * x_hat_b.double() @ correction_a.t().double()).pow(2).sum(dim=1).mean()
        torch.testing.assert_close(evaluate_quadratic(coefficients.sum(dim=1), [alpha])[0], direct, rtol=1e-4, atol=1e-6)
    # q(alpha): per row and group s^2 / 12 * sum over the group's columns of mean x-hat^2.
    alphas = (0.0, 0.5, 1.0)
    noise = grid_noise_curve(weight, correction_a, stats_b.hessian, bits, group, sym=False, alphas=alphas)
    power = x_hat_b.double().pow(2).mean(dim=0)
    for i, alpha in enumerate(alphas):
        moved = weight + alpha * correction_a
        direct = torch.zeros(rows, dtype=torch.float64)
        for g in range(width // group):
            cols = slice(g * group, (g + 1) * group)
            step = compute_grid(moved[:, cols], bits).scales[:, 0].double()
            direct += step ** 2 / 12 * power[cols].sum()
        torch.testing.assert_close(noise[i], direct, rtol=1e-4, atol=0)


def test_output_error_vs_full_precision_matches_explicit_chains():
    generator = torch.Generator().manual_seed(12)
    x_hat, x = chains(300, 32, generator)
    weight = torch.randn(8, 32, generator=generator)
    weight_hat = weight + 0.05 * torch.randn(8, 32, generator=generator)
    error, propagated = output_error_vs_full_precision(weight, weight_hat, gram(x_hat, x))
    reference = (x.double() @ weight.double().t()).norm()
    assert error == pytest.approx(float((x.double() @ weight.double().t() - x_hat.double() @ weight_hat.double().t()).norm()
                                        / reference), rel=1e-4)
    assert propagated == pytest.approx(float(((x - x_hat).double() @ weight.double().t()).norm() / reference), rel=1e-4)


def fade_alpha(x_hat_a, x_a, x_hat_b, x_b, weight, bits=4, rule="both"):
    full = gram(torch.cat([x_hat_a, x_hat_b]), torch.cat([x_a, x_b]))
    half_a, half_b = gram(x_hat_a, x_a), gram(x_hat_b, x_b)
    correction = qep_correction(weight, full.hessian, full.cross, 0.01)
    cross = cross_fitted_coefficients(weight, half_a, half_b, 0.01).sum(dim=1)
    inside = residual_coefficients(weight, correction, full).sum(dim=1)
    noise = grid_noise_curve(weight, correction, full.hessian, bits, 32, False).sum(dim=1)
    return choose_alpha(cross, inside, noise, 1.0, rule)


def test_fade_alpha_is_zero_without_propagated_error_and_in_range_otherwise():
    generator = torch.Generator().manual_seed(21)
    weight = torch.randn(16, 64, generator=generator)
    x_hat_a, _ = chains(200, 64, generator)
    x_hat_b, _ = chains(200, 64, generator)
    none = fade_alpha(x_hat_a, x_hat_a.clone(), x_hat_b, x_hat_b.clone(), weight)
    assert none.alpha == 0.0 and none.rho == 0.0
    x_hat_a, x_a = chains(400, 64, generator, noise=0.05)
    x_hat_b, x_b = chains(400, 64, generator, noise=0.05)
    # Same learnable drift in both halves: a generalising correction, so FADE uses it.
    drift = 0.3 * torch.randn(64, 64, generator=generator) / 8
    good = fade_alpha(x_hat_a, x_hat_a + x_hat_a @ drift, x_hat_b, x_hat_b + x_hat_b @ drift, weight)
    assert 0.0 <= good.alpha <= 1.0 and good.alpha >= 0.5 and good.rho > 0.8


def test_fade_alpha_is_zero_when_the_correction_does_not_generalise():
    # delta is pure noise, independent of X-hat, with few rows per half: the correction fitted on
    # one half is a fit to that half's noise and removes nothing on the other.
    generator = torch.Generator().manual_seed(22)
    width = 64
    weight = torch.randn(16, width, generator=generator)
    x_hat_a = torch.randn(80, width, generator=generator)
    x_hat_b = torch.randn(80, width, generator=generator)
    x_a = x_hat_a + torch.randn(80, width, generator=generator)
    x_b = x_hat_b + torch.randn(80, width, generator=generator)
    choice = fade_alpha(x_hat_a, x_a, x_hat_b, x_b, weight)
    assert choice.alpha <= 0.1 and choice.rho < 0.05
    # The in-sample residual alone (the vulnerability-only ablation) is fooled by the same data.
    assert fade_alpha(x_hat_a, x_a, x_hat_b, x_b, weight, rule="vulnerability").alpha > choice.alpha


def test_gram_accumulator_halves_add_up_to_the_whole():
    generator = torch.Generator().manual_seed(5)
    x_hat = torch.randn(50, 8, generator=generator)
    delta = torch.randn(50, 8, generator=generator)
    half = torch.randint(0, 2, (50,), generator=generator)
    acc = GramAccumulator(8, with_error=True, n_halves=2)
    acc.add(x_hat[:30], delta[:30], half[:30])
    acc.add(x_hat[30:], delta[30:], half[30:])
    whole = acc.stats()
    torch.testing.assert_close(whole.hessian, x_hat.t() @ x_hat / 50)
    torch.testing.assert_close(whole.cross, delta.t() @ x_hat / 50)
    torch.testing.assert_close(whole.error, delta.t() @ delta / 50)
    a = acc.half_stats(0)
    rows = x_hat[half == 0]
    torch.testing.assert_close(a.hessian, rows.t() @ rows / rows.shape[0])
    torch.testing.assert_close(acc.act_mean_abs, x_hat.abs().mean(dim=0))
    with pytest.raises(ValueError, match="delta"):
        acc.add(x_hat, None, half)


@pytest.mark.slow
@pytest.mark.parametrize("width", [1300, 1280])
def test_block_symmetric_gram_accumulation_matches_float64(width):
    """Above GRAM_BLOCK columns only the block upper triangle is accumulated and then mirrored:
    H and D must still equal the full float64 products (a width that the block does not divide
    included), halves and repeated stats() calls too."""
    from fade_kernels.calib.statistics import GRAM_BLOCK

    assert width > GRAM_BLOCK
    generator = torch.Generator().manual_seed(width)
    x_hat = torch.randn(90, width, generator=generator) + 0.5
    delta = 0.1 * torch.randn(90, width, generator=generator)
    half = torch.arange(90) % 2
    acc = GramAccumulator(width, with_error=True, n_halves=2)
    for part in (slice(0, 40), slice(40, 90)):
        acc.add(x_hat[part], delta[part], half[part])
    x64, d64 = x_hat.double(), delta.double()
    for _ in range(2):   # mirroring twice changes nothing
        stats = acc.stats()
        torch.testing.assert_close(stats.hessian.double(), x64.t() @ x64 / 90, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.error.double(), d64.t() @ d64 / 90, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.cross.double(), d64.t() @ x64 / 90, rtol=1e-5, atol=1e-6)
    first = acc.half_stats(0)
    rows = x64[half == 0]
    torch.testing.assert_close(first.hessian.double(), rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-5)


def test_accumulator_keeps_its_rows_only_while_they_are_at_most_the_width():
    generator = torch.Generator().manual_seed(5)
    x_hat, delta = torch.randn(20, 16, generator=generator), torch.randn(20, 16, generator=generator)
    acc = GramAccumulator(16, with_error=True)
    acc.add(x_hat[:10], delta[:10])
    acc.add(x_hat[10:16], delta[10:16])
    kept_x, kept_delta = acc.kept_rows()
    torch.testing.assert_close(kept_x, x_hat[:16], rtol=0, atol=0)
    torch.testing.assert_close(kept_delta, delta[:16], rtol=0, atol=0)
    acc.add(x_hat[16:], delta[16:])   # 20 rows > 16: the rows are no longer kept
    assert acc.kept_rows() is None
    plain = GramAccumulator(16)
    plain.add(x_hat[:4])
    assert plain.kept_rows()[1] is None


@pytest.mark.parametrize("tokens", [40, 200])
def test_output_errors_from_rows_equal_the_gram_formulas_in_float64(tokens):
    """The row path (used when R <= K) and the Gram path give the same errors, checked against
    explicit float64 outputs."""
    generator = torch.Generator().manual_seed(tokens)
    x_hat, x = chains(tokens, 64, generator)
    weight = torch.randn(48, 64, generator=generator)
    weight_hat = weight + 0.05 * torch.randn(48, 64, generator=generator)
    stats = gram(x_hat, x)
    rows = (x_hat, x - x_hat)
    from_rows = output_error_vs_full_precision(weight, weight_hat, stats, rows)
    from_grams = output_error_vs_full_precision(weight, weight_hat, stats)
    w64, w_hat64 = weight.double(), weight_hat.double()
    reference = (x.double() @ w64.t()).norm()
    explicit = float((x.double() @ w64.t() - x_hat.double() @ w_hat64.t()).norm() / reference)
    explicit_propagated = float(((x - x_hat).double() @ w64.t()).norm() / reference)
    for got in (from_rows, from_grams):
        assert got[0] == pytest.approx(explicit, rel=1e-4)
        assert got[1] == pytest.approx(explicit_propagated, rel=1e-4)
    local = float((x_hat.double() @ (w64 - w_hat64).t()).norm() / (x_hat.double() @ w64.t()).norm())
    assert relative_output_error(weight, weight_hat, stats.hessian, x_hat) == pytest.approx(local, rel=1e-5)
    assert relative_output_error(weight, weight_hat, stats.hessian) == pytest.approx(local, rel=1e-4)


def test_choose_alpha_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        choose_alpha(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                     torch.ones(len(ALPHA_GRID), dtype=torch.float64), 1.0, rule="magic")
