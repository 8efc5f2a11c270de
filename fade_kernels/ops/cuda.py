"""CUDA backend: the 3/4-bit decode GEMV (csrc/cuda/qgemv.cu) for M = 1..8 rows.

Importing this module registers the backend "cuda" (priority 5: first for CUDA tensors, before
"triton") with the registry. It is unavailable, with the reason, when the extension
`fade_kernels._C_cuda` is not built (a CPU torch, no nvcc at install) or fails to load, or when
torch sees no CUDA device; nothing raises at import.

Inputs (the checkpoint layout of fade_kernels/packing.py, read in place: no repack):
  x        float16/bfloat16/float32 [..., K], at most MAX_M = 8 rows once flattened
  qweight  int32 [K*bits/32, N]      codes packed along K (3-bit: 32 codes in 3 words)
  qzeros   int32 [G, pad32(N)*bits/32]  true zero points ("v2") packed along N
  scales   float16 [G, N]
  g_idx    int32 [K] or None; must be arange(K) // (K/G) (static groups: the kernel never gathers)
  bias     float [N] or None (passed to the kernel as float32)
Output: [..., N] in x's dtype; fp32 accumulation of x * (q - z) per group, times the scale.
Larger M is left to the other backends (the registry's shape predicate says M <= 8).
"""
from __future__ import annotations

import importlib
import logging

import torch

from fade_kernels.ops.registry import Backend, gpu_backend_status, register_backend
from fade_kernels.packing import check_trivial_g_idx

logger = logging.getLogger(__name__)

CUDA_BITS = (3, 4)
MAX_M = 8
"""Largest row count of the decode kernel (FADE_QGEMV_MAX_M in csrc/cuda/qgemv.h)."""

try:
    # import_module, not `from fade_kernels import _C_cuda`: only it raises ModuleNotFoundError
    # (not built) distinctly from an ImportError of a built but unloadable library.
    _C_cuda = importlib.import_module("fade_kernels._C_cuda")
    _IMPORT_ERROR = ""
except ModuleNotFoundError as exc:
    _C_cuda = None
    if torch.version.cuda is None:
        _IMPORT_ERROR = (f"fade_kernels._C_cuda is not built: torch {torch.__version__} is a CPU build "
                         "(install a CUDA torch and nvcc, then pip install --no-build-isolation -e .)")
    else:
        _IMPORT_ERROR = (f"fade_kernels._C_cuda is not built ({exc}); install nvcc (CUDA_HOME) and reinstall: "
                         "pip install --no-build-isolation -e .")
    logger.info("CUDA backend unavailable: %s", _IMPORT_ERROR)
except ImportError as exc:  # built but not loadable, e.g. against another torch or CUDA runtime
    _C_cuda = None
    _IMPORT_ERROR = (f"fade_kernels._C_cuda failed to load ({exc}); rebuild it against the installed torch: "
                     "pip install --no-build-isolation -e .")
    logger.warning("CUDA backend unavailable: %s", _IMPORT_ERROR)

if _C_cuda is not None and int(_C_cuda.MAX_M) != MAX_M:  # a stale build
    _IMPORT_ERROR = f"fade_kernels._C_cuda handles M <= {_C_cuda.MAX_M}, this module expects {MAX_M}; rebuild it"
    logger.warning("CUDA backend unavailable: %s", _IMPORT_ERROR)
    _C_cuda = None


def cuda_available() -> tuple[bool, str]:
    """(True, "") when the extension is loaded and a CUDA device is visible, else (False, why)."""
    return gpu_backend_status(_IMPORT_ERROR if _C_cuda is None else None)


def cuda_forward(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int, out_features: int) -> torch.Tensor:
    """reference_forward's contract on the CUDA decode kernel: x (..., K) -> (..., N) in x's dtype.

    See the module docstring for every tensor's dtype and layout; x flattened to [M, K] must
    have M <= 8 rows, and all tensors must be on x's CUDA device.
    """
    available, why = cuda_available()
    if not available:
        raise RuntimeError(f"the CUDA backend is unavailable: {why}")
    if bits not in CUDA_BITS:
        raise ValueError(f"bits must be one of {CUDA_BITS} for the CUDA backend, got {bits!r}")
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor for the CUDA backend, got device {x.device}")
    if qweight.dim() != 2 or qweight.shape[1] != out_features:
        raise ValueError(f"qweight must have shape [K*bits/32, N={out_features}], got {tuple(qweight.shape)}")
    k = x.shape[-1]
    if scales.dim() != 2 or scales.shape[0] == 0 or k % scales.shape[0]:
        raise ValueError(f"scales must have shape [G, N] with G dividing K={k}, got {tuple(scales.shape)}")
    group_size = k // scales.shape[0]
    check_trivial_g_idx(g_idx, k, group_size, "the CUDA")
    x2 = x.reshape(-1, k)                                                    # [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    if m > MAX_M:
        raise ValueError(f"the CUDA decode kernel takes at most {MAX_M} rows, got M={m} (use another backend)")
    x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(device=x.device, dtype=torch.float32).contiguous()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    y2 = _C_cuda.qgemv(x2, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), bias, bits, group_size,
                       stream)                                               # [M, N]
    return y2.reshape(*x.shape[:-1], out_features)


def _supports(m: int, bits: int, group_size: int, device: str) -> bool:
    return device == "cuda" and bits in CUDA_BITS and m <= MAX_M and (group_size == -1 or group_size % 32 == 0)


_AVAILABLE, _WHY = cuda_available()
register_backend(Backend(name="cuda", fn=cuda_forward, devices=("cuda",), bits=CUDA_BITS, priority=5,
                         available=_AVAILABLE, why_unavailable=_WHY, supports=_supports))
