"""Backend registry for the quantized matmul.

Each backend is a small record (name, devices, bit widths, a shape predicate, availability and
the reason when unavailable). `auto` walks an explicit per-device order (AUTO_ORDER):

    CUDA tensors: cuda -> triton -> torch      CPU tensors: cpu -> torch

and takes the first backend that is available and supports the layer's bit width, group size
and the activation's row count M (e.g. "cuda" only for M <= 8 and 3/4 bits). Backends not in a
device's order (Triton on CPU tensors under TRITON_INTERPRET, say) run only when named. A
backend named explicitly (argument or the FADE_BACKEND environment variable) runs or raises
with the reason: never a silent fallback. The torch reference is always available and defines
correctness.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from fade_kernels.ops.reference import reference_forward


@dataclass
class Backend:
    """One implementation of y = x @ dequant(qweight)^T + bias.

    fn has reference_forward's signature. supports(m, bits, group_size, device_type) says
    whether this backend handles that call. priority: lower runs first under `auto`.
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    priority: int
    available: bool = True
    why_unavailable: str = ""
    supports: Callable[[int, int, int, str], bool] = lambda m, bits, group_size, device: True
    bind: Callable | None = None
    """Optional: bind(qweight, qzeros, scales, g_idx, bias, bits, out_features) -> a callable
    y = f(x2) for x2 2-D, contiguous, on this backend's device, not needing a gradient, with the
    layer's prepared weights captured (QuantLinear keeps it while its buffers are unchanged)."""


class _BackendTable(dict):
    """name -> Backend. Any change (register_backend, a test replacing an entry) forgets the
    memoized choices of quant_linear_forward."""

    def __setitem__(self, name, backend):
        super().__setitem__(name, backend)
        _CHOICES.clear()

    def __delitem__(self, name):
        super().__delitem__(name)
        _CHOICES.clear()


_CHOICES: dict[tuple, Backend] = {}
"""quant_linear_forward's memo: (requested or FADE_BACKEND, M, bits, group_size, device) -> Backend."""

BACKENDS: dict[str, Backend] = _BackendTable()


def register_backend(backend: Backend) -> None:
    """Add or replace a backend by name."""
    BACKENDS[backend.name] = backend


register_backend(Backend(name="torch", fn=reference_forward, devices=("cpu", "cuda"), bits=(2, 3, 4, 8), priority=100))

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),  # hand-written decode GEMV, then Triton (any M), then reference
    "cpu": ("cpu", "torch"),
}
"""The order `auto` tries backends in, per device type; unregistered names are skipped."""


def auto_order(device: str) -> list[Backend]:
    """The registered backends `auto` tries for tensors on `device`, in order.

    Devices without an AUTO_ORDER entry try every backend listing the device, by priority.
    """
    if device in AUTO_ORDER:
        return [BACKENDS[name] for name in AUTO_ORDER[device] if name in BACKENDS]
    return sorted((b for b in BACKENDS.values() if device in b.devices), key=lambda b: b.priority)


def _can_run(backend: Backend, m: int, bits: int, group_size: int, device: str) -> str:
    """Empty string when `backend` can run this call, else the reason it cannot."""
    if not backend.available:
        return backend.why_unavailable or "not available"
    if device not in backend.devices:
        return f"does not run on {device} tensors (runs on {', '.join(backend.devices)})"
    if bits not in backend.bits:
        return f"does not support bits={bits} (supports {backend.bits})"
    if not backend.supports(m, bits, group_size, device):
        return f"does not support M={m}, bits={bits}, group_size={group_size}"
    return ""


def gpu_backend_status(import_error: str | None) -> tuple[bool, str]:
    """(available, why not) of a GPU backend: (False, import_error) when its module failed to load,
    (False, why) when torch sees no CUDA device, else (True, "")."""
    if import_error is not None:
        return False, import_error
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (torch.cuda.is_available() is False: none, or a CPU-only torch build)"
    return True, ""


# os.environ.get encodes the key and decodes the value on every call (~1 µs, as much as the rest of
# a decode step's Python); os.environ's own mapping of raw bytes answers in ~50 ns and is what
# os.environ.get reads, so putenv-style changes through os.environ are seen at once.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FADE_BACKEND") if _ENV_DATA is not None else None


def env_backend() -> str | None:
    """The FADE_BACKEND environment variable (None when unset), read cheaply on every call."""
    if _ENV_DATA is None:
        return os.environ.get("FADE_BACKEND")
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def select_backend(m: int, bits: int, group_size: int, device: str, requested: str | None = None) -> Backend:
    """The backend to use. requested None -> FADE_BACKEND env or 'auto'."""
    requested = requested or env_backend() or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {requested!r}")
        reason = _can_run(BACKENDS[requested], m, bits, group_size, device)
        if reason:
            raise RuntimeError(f"backend {requested!r} was requested but cannot run: {reason}")
        return BACKENDS[requested]
    reasons = []
    for backend in auto_order(device):
        reason = _can_run(backend, m, bits, group_size, device)
        if not reason:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise RuntimeError(f"no backend can run M={m}, bits={bits}, group_size={group_size} on {device} tensors"
                       + (f" ({'; '.join(reasons)})" if reasons else " (no backend lists this device)"))


def quant_linear_forward(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                         out_features: int, backend: str | None = None) -> torch.Tensor:
    """Front door: x (..., K) float -> (..., N) in x's dtype, through the selected backend.

    The choice is memoized per (backend or FADE_BACKEND, M, bits, group_size, device): a decode
    step pays one dict lookup instead of walking the auto order (see select_backend for the rule).
    """
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    key = (backend or env_backend(), m, bits, group_size, "cpu" if x.is_cpu else x.device.type)
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen = select_backend(m, bits, group_size, key[4], backend)
        if len(_CHOICES) > 4096:  # many distinct M (long prompts): keep the memo bounded
            _CHOICES.clear()
        _CHOICES[key] = chosen
    return chosen.fn(x, qweight, qzeros, scales, g_idx, bias, bits, out_features)


def tensor_version(t: torch.Tensor | None) -> int:
    """t's in-place version counter (0 for None, -1 for inference tensors, which have none and cannot
    change in place outside inference mode): the key of every cache of prepared weights."""
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:
        return -1


def bind_forward(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, out_features: int, m: int, device: str,
                 backend: str | None = None) -> Callable | None:
    """The selected backend's bound forward for these tensors (see Backend.bind), or None when it has none."""
    chosen = select_backend(m, bits, group_size, device, backend)
    if chosen.bind is None:
        return None
    return chosen.bind(qweight, qzeros, scales, g_idx, bias, bits, out_features)


def backend_table() -> list[dict]:
    """One row per backend for `fade info`: name, devices, bits, available, reason."""
    return [
        {"name": b.name, "devices": ",".join(b.devices), "bits": ",".join(map(str, b.bits)),
         "available": b.available, "why_unavailable": b.why_unavailable}
        for b in sorted(BACKENDS.values(), key=lambda b: b.priority)
    ]
