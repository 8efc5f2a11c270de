"""The reversed factorisation (one Cholesky + one triangular inverse) against the three-step one."""
import logging

import pytest
import torch

from fade_kernels.solver.factor import damped_hessian, inverse_cholesky_upper, lower_triangular_inverse


def random_hessian(k: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """X X^T / T (K, K) with correlated features, like a layer-input Hessian (not exactly
    symmetric in float32, as a real one is not)."""
    mixing = torch.randn(k, k, generator=generator, dtype=dtype) / k ** 0.5 + torch.eye(k, dtype=dtype)
    x = mixing @ torch.randn(k, 2 * k + 3, generator=generator, dtype=dtype)
    return x @ x.t() / x.shape[1]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 7, 64, 257, 600])
def test_float64_factors_agree(k, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    hessian = random_hessian(k, gen, torch.float64)
    reversed_ = inverse_cholesky_upper(hessian, 0.01, method="reversed")
    three_step = inverse_cholesky_upper(hessian, 0.01, method="three_step")
    assert torch.equal(reversed_, reversed_.triu()) and bool((torch.diagonal(reversed_) > 0).all())
    assert rel_diff(reversed_, three_step) < 1e-11
    inverse = torch.linalg.inv(damped_hessian(hessian, 0.01))
    assert rel_diff(reversed_.t() @ reversed_, inverse) < 1e-11


@pytest.mark.slow
@pytest.mark.parametrize("k", [5, 128, 513])
def test_float32_factor_as_accurate_as_three_step(k, _fresh_seed):
    # Both float32 factors against the float64 truth. The reversed one may be 2x as far off as
    # the three-step one, or up to cond(H) * u (u = 2^-24, the usual forward-error bound of an
    # inverse); over 500 seeds the worst seen was 0.53 * cond(H) * u, at K = 5.
    gen = torch.Generator().manual_seed(_fresh_seed)
    hessian = random_hessian(k, gen)
    truth = inverse_cholesky_upper(hessian.double(), 0.01, method="three_step")
    reversed_ = inverse_cholesky_upper(hessian, 0.01, method="reversed")
    three_step = inverse_cholesky_upper(hessian, 0.01, method="three_step")
    assert reversed_.dtype == torch.float32
    cond = float(torch.linalg.cond(damped_hessian(hessian.double(), 0.01)))
    assert rel_diff(reversed_, truth) <= max(2 * rel_diff(three_step, truth), cond * 2.0 ** -24)


def test_both_methods_read_the_lower_triangle():
    # A float32 X X^T is symmetric only up to rounding; both methods must read the same triangle.
    gen = torch.Generator().manual_seed(1)
    hessian = random_hessian(40, gen, torch.float64)
    skewed = hessian.clone()
    skewed[torch.triu_indices(40, 40, 1).unbind()] += 0.05
    lower_only = torch.tril(hessian) + torch.tril(hessian, -1).t()
    for method in ("reversed", "three_step"):
        from_skewed = inverse_cholesky_upper(skewed, 0.01, method)
        assert rel_diff(from_skewed, inverse_cholesky_upper(lower_only, 0.01, method)) < 1e-12


@pytest.mark.parametrize("k", [3, 256, 257, 777])
def test_lower_triangular_inverse(k, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    lower = torch.randn(k, k, generator=gen, dtype=torch.float64).tril() / k ** 0.5
    lower.diagonal().copy_(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)
    inverse = lower_triangular_inverse(lower)
    assert torch.equal(inverse, inverse.tril())
    assert rel_diff(inverse @ lower, torch.eye(k, dtype=torch.float64)) < 1e-11


@pytest.mark.parametrize("method", ["reversed", "three_step"])
def test_damping_is_raised_when_not_positive_definite(method, caplog):
    # Eigenvalues -0.02 .. 0.98 (mean diagonal 0.48): damp=0.01 adds 0.0048 and leaves it
    # indefinite, the first retry (damp=0.1) adds 0.048 and makes it positive definite.
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    eig = torch.linspace(1, 2, 30, dtype=torch.float64) - 1.02
    hessian = q @ torch.diag(eig) @ q.t()
    with caplog.at_level(logging.WARNING, logger="fade_kernels.solver.factor"):
        upper = inverse_cholesky_upper(hessian, 0.01, method)
    assert "retrying with damp=0.1" in caplog.text
    assert rel_diff(upper.t() @ upper, torch.linalg.inv(damped_hessian(hessian, 0.1))) < 1e-10


@pytest.mark.parametrize("method", ["reversed", "three_step"])
def test_hopeless_hessian_raises(method):
    with pytest.raises(RuntimeError, match="not positive definite even with heavy damping"):
        inverse_cholesky_upper(torch.zeros(8, 8), 0.01, method)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        inverse_cholesky_upper(torch.eye(4), 0.01, method="lu")
    with pytest.raises(ValueError, match=r"hessian must be square \(K, K\)"):
        inverse_cholesky_upper(torch.eye(4)[:3], 0.01)
