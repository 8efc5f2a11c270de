import pytest
import torch

from fade_kernels.solver.grid import compute_grid, dequantize_codes, quantize_to_codes
from fade_kernels.solver.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_step(bits, sym):
    weight = torch.randn(16, 128)
    codes, scales, zeros = rtn_quantize(weight, bits, 32, sym)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    w_hat = dequantize_codes(codes, scales.repeat_interleave(32, 1), zeros.repeat_interleave(32, 1).float())
    # Inside the grid range every value is within half a step (plus fp16 rounding of the scale).
    step = scales.repeat_interleave(32, 1)
    assert ((weight - w_hat).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all()


def test_asymmetric_grid_matches_hand_computation():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    scales, zeros = compute_grid(w, bits=2)
    assert scales.item() == pytest.approx(1.0)        # (2 - (-1)) / 3
    assert zeros.item() == 1.0                          # round(1 / 1)
    assert quantize_to_codes(w, scales, zeros, 2).tolist() == [[0.0, 1.0, 3.0, 1.0]]   # round half to even


def test_symmetric_grid_zero_point_and_scale():
    w = torch.tensor([[-3.0, 1.0, 2.0, 0.5]])
    scales, zeros = compute_grid(w, bits=3, sym=True)
    assert zeros.item() == 4.0 and scales.item() == pytest.approx(1.0)   # 3 / (2^2 - 1)


def test_all_zero_group_dequantizes_to_zero():
    codes, scales, zeros = rtn_quantize(torch.zeros(2, 32), 4, 32)
    assert torch.equal(dequantize_codes(codes, scales, zeros.float()), torch.zeros(2, 32))


def test_scales_are_float16_representable():
    _, scales, _ = rtn_quantize(torch.randn(8, 64) * 1e-3, 4, 32)
    assert torch.equal(scales, scales.half().float())


def test_rtn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn_quantize(torch.randn(4, 64), bits=5)
    with pytest.raises(ValueError, match="group_size must be one of"):
        rtn_quantize(torch.randn(4, 64), group_size=48)
    with pytest.raises(ValueError, match="group_size=128 does not divide the input width in_features=288"):
        rtn_quantize(torch.randn(4, 288), group_size=128)


def test_scales_round_up_so_the_range_is_covered():
    weight = torch.randn(64, 32)
    scales, _ = compute_grid(weight, bits=8)
    wmin = weight.amin(1, keepdim=True).clamp(max=0)
    wmax = weight.amax(1, keepdim=True).clamp(min=0)
    assert ((wmax - wmin) / 255 <= scales).all()
    assert ((wmax - wmin) / 255 > torch.nextafter(scales.half(), torch.zeros_like(scales.half())).float()).all()
