"""`fade::quant_linear`: the quantized matmul front door as a torch.library custom op.

torch.compile cannot trace into the backends (pybind11 extensions, Triton launchers with
caches, a Python registry reading FADE_BACKEND), so the front door is one opaque op with a
fake (meta) implementation giving the output's shape and dtype; Dynamo and AOTAutograd then
trace a quantized model with `fullgraph=True`. The real implementation is
`registry.quant_linear_forward`: backend selection (auto order, FADE_BACKEND, the `backend`
argument) happens inside it at run time, exactly as in eager mode.

Arguments (K = in_features, N = out_features, G = K / group_size):
  x        float32/bfloat16/float16 [..., K]
  qweight  int32 [K*bits/32, N];  qzeros int32 [G, pad32(N)*bits/32];  scales float16 [G, N]
  g_idx    int32 [K] or None;  bias float [N] or None
  bits, group_size, out_features: ints;  backend: a registry name, "auto" or None
Returns [..., N] in x's dtype.

Autograd: the gradient with respect to x only (the packed weight is frozen), through the torch
reference's dequantized weight: dx = dy @ W_hat.
"""
from __future__ import annotations

from typing import Optional

import torch

from fade_kernels.ops.reference import input_gradient
from fade_kernels.ops.registry import quant_linear_forward


@torch.library.custom_op("fade::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int,
                 out_features: int, backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ W_hat^T + bias through the selected backend (see the module docstring)."""
    y = quant_linear_forward(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out_features, backend)
    # A custom op's output may not alias an input; no backend returns a view today, but a
    # future one returning x itself (an empty K, say) must not break the op's contract.
    return y.clone() if y.data_ptr() == x.data_ptr() and y.numel() else y


@quant_linear.register_fake
def _quant_linear_fake(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out_features, backend=None):
    torch._check(qweight.dim() == 2 and qweight.shape[1] == out_features,
                 lambda: f"qweight must have shape [K*bits/32, N={out_features}], got {tuple(qweight.shape)}")
    torch._check(x.shape[-1] * bits == qweight.shape[0] * 32,
                 lambda: f"x's last dimension must be K = qweight.shape[0]*32/bits = {qweight.shape[0] * 32 // bits}, "
                         f"got {x.shape[-1]}")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    _, qweight, qzeros, scales, g_idx, _, bits, _, out_features, _ = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)
    ctx.bits, ctx.out_features = bits, out_features


def _backward(ctx, grad_y):
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = input_gradient(grad_y, qweight, qzeros, scales, g_idx, ctx.bits, ctx.out_features)
    return grad_x, None, None, None, None, None, None, None, None, None


quant_linear.register_autograd(_backward, setup_context=_setup_context)
