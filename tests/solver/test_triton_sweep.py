"""The fused Triton GPTQ sweep equals the torch reference loop bit for bit (interpreter, CPU).

The reference is `gptq.gptq_sweep(..., impl="torch")`, the Python loop of torch calls, run on
the same weight and the same U factor. Codes, scales, zero points and the per-row loss must be
identical (torch.equal), not close. Shapes are small because TRITON_INTERPRET runs the kernel in
numpy (tests/conftest.py sets it before triton is imported).
"""
import pytest
import torch

from fade_kernels.solver.gptq import StaticGrids, gptq_quantize, gptq_sweep
from fade_kernels.solver.grid import compute_grid
from fade_kernels.solver.triton_sweep import static_grids_for, triton_gptq_sweep


# The Triton GPTQ sweep under the interpreter.
pytestmark = [pytest.mark.slow]


def correlated_hessian(k: int, gen: torch.Generator) -> torch.Tensor:
    """H = X X^T / T (K, K) for strongly correlated inputs, like real activations."""
    mixing = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = mixing @ torch.randn(k, 4 * k, generator=gen) + 0.5 * torch.randn(k, 1, generator=gen)
    return x @ x.t() / x.shape[1]


def upper_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U with U^T U = (H + damp * mean diag * I)^-1, the usual three-step recipe, float32."""
    h = hessian.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).contiguous()


def assert_same_as_torch(weight, u, bits, group_size, sym, block_size, static=None, **kwargs):
    ref = gptq_sweep(weight.clone(), u, bits, group_size, sym, block_size, static, impl="torch")
    loss = torch.zeros(weight.shape[0])
    out = triton_gptq_sweep(weight, u, bits, group_size, sym, block_size, static, loss_out=loss, **kwargs)
    assert out.codes.dtype == torch.int32 and out.zeros.dtype == torch.int32
    mismatched = int((out.codes != ref.codes).sum())
    assert mismatched == 0, f"{mismatched} of {out.codes.numel()} codes differ"
    assert torch.equal(out.scales, ref.scales)
    assert torch.equal(out.zeros, ref.zeros.to(torch.int32))
    # The loss sums err^2 column by column: equal only if every error was bit-identical too.
    assert torch.equal(loss, ref.loss)
    return out


@pytest.mark.parametrize("n,k,bits,group_size,sym,block_size,act_order,block_rows", [
    (40, 64, 4, 32, False, 32, False, 16),    # 3 row tiles, the last one partial
    (40, 64, 3, 32, True, 32, True, None),
    (24, 256, 4, -1, False, 64, False, None),  # one group over 4 blocks: later blocks reuse its grid
    (24, 256, 3, -1, True, 32, True, None),
    (24, 256, 3, 32, False, 64, True, None),
    (24, 128, 4, 32, False, 48, False, None),  # groups straddling block ends; a short last block
    (24, 128, 8, 64, True, 32, False, None),
    (24, 128, 2, 128, False, 128, False, None),
])
def test_equals_torch_loop(_fresh_seed, n, k, bits, group_size, sym, block_size, act_order, block_rows):
    gen = torch.Generator().manual_seed(_fresh_seed)
    hessian = correlated_hessian(k, gen)
    # Rows of different magnitudes, one all-zero row (degenerate grid) and one dead input column.
    weight = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    weight[3] = 0.0
    weight[:, 7] = 0.0
    static = None
    if act_order:
        perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        static = static_grids_for(weight, perm, bits, group_size, sym)
        weight, hessian = weight[:, perm], hessian[perm][:, perm]
    assert_same_as_torch(weight, upper_factor(hessian), bits, group_size, sym, block_size, static,
                         block_rows=block_rows)


def test_qep_corrected_weight_is_just_another_weight(_fresh_seed):
    # QEP/FADE hand the sweep W + a correction computed from the activations; the sweep must not
    # care where W came from, e.g. a correction that pushes some columns far outside the rest.
    gen = torch.Generator().manual_seed(_fresh_seed)
    hessian = correlated_hessian(64, gen)
    weight = torch.randn(16, 64, generator=gen)
    correction = torch.randn(16, 64, generator=gen) @ torch.diag(torch.rand(64, generator=gen) ** 4 * 5)
    assert_same_as_torch(weight + correction, upper_factor(hessian), 4, 32, False, 32)


def test_round_half_to_even_ties_match_torch(_fresh_seed):
    # With U = I the sweep is RTN. Every group holds -8/16 and 7/16, so s = 1/16 and z = 8 exactly,
    # and the other values sit on exact half steps (w / s = m + 0.5): floor(x + 0.5) or
    # round-half-away would move half of them one code up. torch.round (and the kernel) round
    # half to even.
    gen = torch.Generator().manual_seed(_fresh_seed)
    n, k = 8, 64
    halves = (torch.randint(-8, 7, (n, k), generator=gen).float() + 0.5) / 16
    halves[:, 0::32], halves[:, 1::32] = -0.5, 7 / 16
    eye = torch.eye(k)
    out = assert_same_as_torch(halves, eye, 4, 32, False, 32)
    assert torch.equal(out.scales, torch.full((n, 2), 1 / 16)) and torch.equal(out.zeros, torch.full((n, 2), 8))
    expected = torch.round(halves * 16) + 8  # exact: ties to even
    assert torch.equal(out.codes, expected.to(torch.int32))
    # The test is only meaningful if ties to even and ties away from zero really disagree here.
    assert not torch.equal(expected, torch.floor(halves * 16 + 0.5) + 8)


def test_static_grids_for_matches_per_group_compute_grid(_fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    weight = torch.randn(12, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    static = static_grids_for(weight, perm, 3, 32, sym=False)
    for grp in range(4):
        scales, zeros = compute_grid(weight[:, grp * 32:(grp + 1) * 32], 3, False)
        assert torch.equal(static.scales[:, grp:grp + 1], scales) and torch.equal(static.zeros[:, grp:grp + 1], zeros)
    assert torch.equal(static.column_group, perm // 32)


def test_rejects_bad_arguments(monkeypatch):
    w, u = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match=r"u_factor must have shape \(64, 64\)"):
        triton_gptq_sweep(w, torch.eye(32), 4, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        triton_gptq_sweep(w, u, 5, 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        triton_gptq_sweep(w, u, 4, 48)
    with pytest.raises(ValueError, match="block_size must be positive"):
        triton_gptq_sweep(w, u, 4, 32, block_size=0)
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        triton_gptq_sweep(w, u, 4, 32, block_rows=12)
    bad = StaticGrids(torch.ones(8, 3), torch.zeros(8, 3), torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"static_grids scales/zeros must have shape \(8, 2\)"):
        triton_gptq_sweep(w, u, 4, 32, static_grids=bad)
    bad = StaticGrids(torch.ones(8, 2), torch.zeros(8, 2), torch.full((64,), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"column_group must lie in \[0, 2\)"):
        triton_gptq_sweep(w, u, 4, 32, static_grids=bad)
    with pytest.raises(ValueError, match=r"loss_out must be float32 \(8,\)"):
        triton_gptq_sweep(w, u, 4, 32, loss_out=torch.zeros(7))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        triton_gptq_sweep(w, u, 4, 32)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_quantize_with_the_triton_sweep_equals_the_torch_loop(act_order):
    generator = torch.Generator().manual_seed(31 + act_order)
    weight = torch.randn(24, 128, generator=generator)
    x = torch.randn(400, 128, generator=generator) @ (torch.eye(128) + 0.1 * torch.randn(128, 128, generator=generator))
    hessian = x.t() @ x / 400
    ref = gptq_quantize(weight, hessian, bits=3, group_size=32, act_order=act_order, block_size=64, sweep="torch")
    got = gptq_quantize(weight, hessian, bits=3, group_size=32, act_order=act_order, block_size=64, sweep="triton")
    assert torch.equal(ref.codes, got.codes) and torch.equal(ref.scales, got.scales) and torch.equal(ref.zeros, got.zeros)
    assert ref.loss == got.loss
