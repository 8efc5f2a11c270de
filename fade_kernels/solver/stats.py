"""GramStats: the statistics of one input group, as every solver reads them."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GramStats:
    """Gram matrices of one input group, float32 (K, K) each, means over `rows` valid rows.

    cross (G) and error (D) are None when the full-precision chain was not run.
    """

    hessian: torch.Tensor
    cross: torch.Tensor | None
    error: torch.Tensor | None
    rows: int
