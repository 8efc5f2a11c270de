"""QuantLinear: a drop-in nn.Linear replacement holding packed GPTQ-layout buffers."""
from __future__ import annotations

import torch
from torch import nn

from fade_kernels.config import resolve_group_size, validate_grid_args
from fade_kernels.numerics import check_finite, check_float16_scales
from fade_kernels.ops.custom_op import quant_linear as quant_linear_op
from fade_kernels.ops.registry import bind_forward, env_backend, quant_linear_forward, tensor_version
from fade_kernels.packing import codes_per_run, pack_qweight, pack_qzeros, padded_width



class _Binding:
    """What a QuantLinear's bound forward was made for (QuantLinear._bound_forward)."""

    __slots__ = ("qweight", "qzeros", "scales", "g_idx", "bias", "versions", "backend", "env", "m", "fn")

    def __init__(self, qweight, qzeros, scales, g_idx, bias, versions, backend, env, m, fn):
        self.qweight, self.qzeros, self.scales, self.g_idx, self.bias = qweight, qzeros, scales, g_idx, bias
        self.versions, self.backend, self.env, self.m, self.fn = versions, backend, env, m, fn


class QuantLinear(nn.Module):
    """y = x @ W_hat^T + b with W_hat stored packed (docs/methods.md §9).

    Buffers (K = in_features, N = out_features, G = K / group_size):
      qweight int32 [K*bits/32, N], qzeros int32 [G, pad32(N)*bits/32], scales float16 [G, N],
      g_idx int32 [K] (group of each input column), bias float32 [N] or absent.
    The zero points stored in qzeros are the true zeros z (GPTQ "v2" convention).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = True, sym: bool = False, backend: str | None = None):
        super().__init__()
        validate_grid_args(bits, group_size)
        run, words = codes_per_run(bits)
        if in_features % run != 0:
            raise ValueError(f"in_features={in_features} must be a multiple of {run} for {bits}-bit packing")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym, self.backend = bits, sym, backend
        self.group_size = resolve_group_size(group_size, in_features)
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features // run * words, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, padded_width(out_features) // run * words, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", (torch.arange(in_features) // self.group_size).to(torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None = None, sym: bool = False, backend: str | None = None) -> "QuantLinear":
        """Build from solver output: codes int (N, K), scales float (N, G), zeros int (N, G), bias (N,)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, sym=sym, backend=backend)
        if scales.shape != (out_features, in_features // layer.group_size):
            raise ValueError(f"scales must have shape {(out_features, in_features // layer.group_size)}, got {tuple(scales.shape)}")
        check_finite(scales, "scales")
        check_float16_scales(scales)   # stored as float16: a larger scale would become inf
        layer.qweight.copy_(pack_qweight(codes, bits))
        layer.qzeros.copy_(pack_qzeros(zeros, bits))
        layer.scales.copy_(scales.t().half())
        if bias is not None:
            layer.bias.copy_(bias.float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = False,
                    backend: str | None = None) -> "QuantLinear":
        """Quantize an nn.Linear with round-to-nearest (the quick way to try a kernel on a layer)."""
        from fade_kernels.solver.rtn import rtn_quantize

        codes, scales, zeros = rtn_quantize(linear.weight.detach(), bits, group_size, sym)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_codes(codes, scales, zeros, bits, group_size, bias, sym, backend).to(linear.weight.device)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer multiplies by."""
        from fade_kernels.ops.reference import dequantize_weight

        return dequantize_weight(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) float32/bfloat16/float16 -> (..., N) in x's dtype.

        Under torch.compile / torch.export the call is the custom op `fade::quant_linear`
        (opaque to Dynamo, shape from its fake implementation). In eager mode the op's own
        implementation is called directly: the same function and backend choice, without the
        custom op's Python dispatch, which doubled the cost of a small M = 1 layer. When x needs
        a gradient the op is used in eager mode too: its registered backward (dx = dy @ W_hat)
        covers every backend, including those without an autograd formula of their own.
        """
        if x.dim() == 0:
            raise ValueError(f"input must have at least 1 dimension (..., in_features={self.in_features}), got a 0-d tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got {x.shape[-1]}")
        use_op = (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()
        if not use_op and x.is_cpu:
            y = self._bound_forward(x)
            if y is not None:
                return y
        # The buffers straight from the buffer dict (nn.Module.__getattr__ per buffer costs ~1 µs).
        buffers = self._buffers
        bias = buffers.get("bias")
        if bias is None:
            bias = self.bias  # None, or a bias held some other way (a parameter)
        forward = quant_linear_op if use_op else quant_linear_forward
        return forward(x, buffers["qweight"], buffers["qzeros"], buffers["scales"], buffers["g_idx"], bias, self.bits,
                       self.group_size, self.out_features, self.backend)

    def _bound_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decode-step fast path: the backend's bound forward (registry.bind_forward) for this M,
        kept while the buffers (identity and version), the backend request and FADE_BACKEND stay the
        same; None when the backend binds nothing or x is not contiguous (then the front door runs).
        Every check is a plain attribute read: this path runs once per layer per decoded token."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            return None
        buffers = self._buffers
        qweight, qzeros, scales, g_idx = buffers["qweight"], buffers["qzeros"], buffers["scales"], buffers["g_idx"]
        bias = buffers.get("bias")
        if bias is None:
            bias = self.bias
        try:  # (tensor_version, inlined)
            versions = (qweight._version, qzeros._version, scales._version, 0 if bias is None else bias._version)
        except RuntimeError:
            versions = tuple(tensor_version(t) for t in (qweight, qzeros, scales, bias))
        m = x2.shape[0]
        bound = self.__dict__.get("_bound")
        if bound is None or bound.m != m or bound.versions != versions or bound.qweight is not qweight or \
                bound.qzeros is not qzeros or bound.scales is not scales or bound.g_idx is not g_idx or \
                bound.bias is not bias or bound.backend != self.backend or bound.env != env_backend():
            fn = bind_forward(qweight, qzeros, scales, g_idx, bias, self.bits, self.group_size, self.out_features,
                              m, "cpu", self.backend)
            self.__dict__["_bound"] = bound = _Binding(qweight, qzeros, scales, g_idx, bias, versions, self.backend,
                                                       env_backend(), m, fn)
        if bound.fn is None:
            return None
        y2 = bound.fn(x2)
        return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        grid = "sym" if self.sym else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {grid}, bias={self.bias is not None}")


def replace_linears(model: nn.Module, names: list[str], make: "callable") -> None:
    """Swap each named nn.Linear of `model` for make(name, linear) (a QuantLinear)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
