"""Numerical guards of the solvers: a bad number is an error naming the layer, never a wrong model.

The solvers are pure functions on tensors and do not know which layer they work on; the pipeline
says it once around a solve:

  with solving("model.encoder.layers.3.self_attn.q_proj, ...k_proj, ...v_proj"):
      gptq_quantize(...)        # a NaN weight -> NumericalError("model.encoder.layers.3...: weight has ...")

Checks: non-finite weights or Hessians (NumericalError), grid scales beyond float16's range, which
the checkpoint stores (NumericalError: the layer's weights are too large to be represented), and
an all-zero Hessian (a warning: every input of the layer was zero on the calibration data, so
GPTQ zeroes its weights).
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator

import torch

FLOAT16_MAX = float(torch.finfo(torch.float16).max)

_current_layer: contextvars.ContextVar[str | None] = contextvars.ContextVar("fade_current_layer", default=None)


class NumericalError(ValueError):
    """Weights or statistics the solvers cannot turn into a correct quantized layer."""


@contextlib.contextmanager
def solving(layer: str) -> Iterator[None]:
    """Name the layer(s) being solved in every error and warning raised inside the block."""
    token = _current_layer.set(layer)
    try:
        yield
    finally:
        _current_layer.reset(token)


def _where(what: str) -> str:
    layer = _current_layer.get()
    return f"{layer}: {what}" if layer else what


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NumericalError when `tensor` holds NaN or inf; `what` names it ("weight", "hessian")."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = ~torch.isfinite(tensor)
        count, nan = int(bad.sum()), int(torch.isnan(tensor).sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NumericalError(_where(f"{what} has {count} non-finite values ({nan} NaN, {count - nan} inf; first at "
                                    f"index {first}): the model or the calibration statistics are broken; check the "
                                    f"checkpoint (or the calibration audio)"))


def check_float16_scales(scales: torch.Tensor) -> None:
    """Raise NumericalError when a grid scale (float32, any shape) does not fit float16, the dtype the
    checkpoint stores scales in (the layer's weights are too large for the grid), or is not finite."""
    if not scales.numel():
        return
    largest = float(scales.detach().abs().nan_to_num(nan=float("inf")).amax())
    if not largest <= FLOAT16_MAX:
        raise NumericalError(_where(f"a quantization scale of {largest:.4g} exceeds float16's maximum "
                                    f"{FLOAT16_MAX:.0f}, the dtype checkpoints store scales in: the layer's weights are "
                                    f"too large to be stored; leave it unquantized or rescale the model"))


def warn_if_all_zero_hessian(dead: torch.Tensor) -> None:
    """Warn when every input column is dead (diag H == 0): GPTQ then sets the whole weight to zero."""
    if dead.numel() and bool(dead.all()):
        warnings.warn(_where("every input of this layer was zero on the calibration data (all-zero Hessian): GPTQ "
                             "sets its weights to zero; check the calibration audio"), RuntimeWarning, stacklevel=3)
