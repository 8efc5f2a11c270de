"""Validated quantization settings shared by the solvers, QuantLinear and the CLI."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear layers are quantized.

    bits: code width (2, 3, 4 or 8). group_size: input columns sharing one scale/zero
    (32, 64, 128, or -1 for one group per output row). sym: symmetric grid (zero fixed at
    2^(bits-1)); asymmetric is the default because at 3 bits a symmetric grid wastes a level.
    act_order: GPTQ visits columns by decreasing Hessian diagonal, with static groups.
    block_size: GPTQ lazy-update block width. damp: GPTQ damping as a fraction of mean diag H.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01
    skip_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate_grid_args(self.bits, self.group_size)
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"method must be one of {SUPPORTED_METHODS}, got {self.method!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not (0.0 <= self.damp < 1.0):
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skip_modules"] = list(self.skip_modules)
        return out


def validate_grid_args(bits: int, group_size: int) -> None:
    """Raise a ValueError naming the argument when bits or group_size is unsupported."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")


def resolve_group_size(group_size: int, in_features: int) -> int:
    """The effective group width for a layer with `in_features` inputs.

    -1 means one group over the whole row. Otherwise the group must divide the width:
    ragged last groups are not supported because the packed GPTQ layout has none.
    """
    if group_size == -1:
        return in_features
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the input width in_features={in_features}; "
            f"use a group size that divides it or group_size=-1"
        )
    return group_size
