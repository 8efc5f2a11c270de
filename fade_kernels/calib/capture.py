"""Capture a stack's first-block inputs, and accumulate Hessians over valid rows with hooks."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments as one keyword dict (positional ones named by the signature),
    so the pipeline can replace hidden_states or encoder_hidden_states by name."""
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    return call


def capture_block_inputs(block: nn.Module, run: Callable[[], object]) -> dict:
    """Run `run()` (a forward of the stack) until `block` is called; return its call kwargs."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(_bind_call(module, args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the stack never called its first block; cannot capture calibration inputs")
    return captured


def run_block(block: nn.Module, call: dict) -> torch.Tensor:
    """block(**call) -> hidden states (B, T, D); tuple outputs keep their first element."""
    out = block(**call)
    return out[0] if isinstance(out, (tuple, list)) else out


class HessianAccumulator:
    """Running H = X X^T / T over valid rows of a layer input, float32 (K, K).

    Rows whose mask is False (padded encoder frames, pad tokens) are dropped, so the mean is
    over real tokens only.
    """

    def __init__(self, width: int):
        self.sum = torch.zeros(width, width, dtype=torch.float32)
        self.rows = 0
        self.total_rows = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """x: float (B, T, K); mask: bool (B, T)."""
        if x.shape[:2] != mask.shape:
            raise ValueError(f"input rows {tuple(x.shape[:2])} do not match the mask {tuple(mask.shape)}")
        rows = x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float()
        self.sum.addmm_(rows.t(), rows)
        self.rows += rows.shape[0]
        self.total_rows += mask.numel()

    @property
    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise RuntimeError("no valid calibration rows reached this layer")
        return self.sum / self.rows


def hessian_hook(accumulator: HessianAccumulator, mask_ref: dict, mask_key: str):
    """A forward pre-hook that feeds the module's input into `accumulator`; the current batch's
    masks are read from mask_ref[mask_key] (set by the pipeline before each batch)."""

    def hook(module, args):
        accumulator.add(args[0].detach(), mask_ref[mask_key])

    return hook
