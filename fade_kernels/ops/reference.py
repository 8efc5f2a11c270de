"""Plain-torch reference for the packed dequant-matmul: the definition of correct."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fade_kernels.packing import unpack_qweight, unpack_qzeros


def dequantize_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Rebuild the float32 weight (N, K) from the packed GPTQ tensors.

    qweight int32 [K*bits/32, N]; qzeros int32 [G, pad32(N)*bits/32]; scales float16 [G, N];
    g_idx int32 [K] (group of each input column).
    """
    codes = unpack_qweight(qweight, bits).float()                     # (N, K)
    zeros = unpack_qzeros(qzeros, bits, out_features).float()         # (N, G)
    group = g_idx.long()
    return (codes - zeros[:, group]) * scales.float().t()[:, group]   # (N, K)


def reference_forward(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, out_features: int) -> torch.Tensor:
    """y = x @ W_hat^T + bias in x's dtype. x: (..., K) float32/bfloat16/float16 -> (..., N)."""
    weight = dequantize_weight(qweight, qzeros, scales, g_idx, bits, out_features).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quantize_activations_q8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU int8-activation kernel's quantizer, in torch (the definition its C++ must match bit for bit).

    x float (M, K), K a multiple of group_size. Per group of `group_size` consecutive inputs:
    scale = max|x| / 127 and q = round_half_even(x * (127 / max|x|)) in [-127, 127] (all-zero
    groups: scale 0, q 0). Returns (q int8 (M, K), scale float32 (M, K / group_size)); x is
    approximated by q * scale, within scale / 2 per element.
    """
    m, k = x.shape
    xg = x.float().reshape(m, k // group_size, group_size)
    amax = xg.abs().amax(dim=-1, keepdim=True)                                    # (M, G, 1)
    # A true division (127.0 / tensor would compute reciprocal(amax) * 127, rounding twice).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xg * inv).clamp(-127, 127).to(torch.int8).reshape(m, k)
    return q, (amax / 127.0).squeeze(-1)


def input_gradient(grad_y: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None, bits: int, out_features: int) -> torch.Tensor:
    """dL/dx = dL/dy @ W_hat for y = x @ W_hat^T: the packed weight is frozen, so x is the only input
    with a gradient. grad_y (..., N) float; the packed tensors as in dequantize_weight (g_idx None
    means static groups). Returns (..., K) in grad_y's dtype, computed in float32."""
    if g_idx is None:
        k = qweight.shape[0] * 32 // bits
        g_idx = torch.arange(k, device=qweight.device) // (k // scales.shape[0])
    weight = dequantize_weight(qweight, qzeros, scales, g_idx, bits, out_features)   # (N, K) fp32
    return (grad_y.float() @ weight).to(grad_y.dtype)                                  # (..., K)
