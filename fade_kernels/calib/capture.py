"""Capture a stack's first-block inputs and run a block on recorded call arguments."""
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
