"""Validated quantization settings shared by the solvers, QuantLinear and the CLI."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
FADE_RULES = ("both", "reliability", "vulnerability")


@dataclass(frozen=True)
class Method:
    """What a method name means to the pipeline, decoded once (docs/methods.md).

    propagation: None (quantize W against the quantized chain's inputs), "qep" (one global alpha:
      W*(alpha) = W + alpha W G (H + lq I)^-1) or "fade" (a per-layer alpha from FADE's
      diagnostics). Both need the full-precision chain; "fade" also keeps statistics per
      cross-fitting half.
    solver: the base solver that turns the (possibly corrected) weight into codes: "rtn" or "gptq".
    input_scale: AWQ's activation-aware input-channel scales are searched before the solver, and
      the post-step folds 1/s into whatever produces the group's input (a LayerNorm or v_proj).
    clip: the grid range (CLIP_METHODS) used when QuantConfig.clip is not given. FADE searches
      the Hessian-weighted range: on tiny.en at 3 bits it lowered WER on real and synthetic
      speech over three calibration seeds (benchmarks/results/real-speech-3bit/README.md).
    """

    name: str
    propagation: str | None
    solver: str
    input_scale: bool = False
    clip: str = "minmax"

    @property
    def propagates(self) -> bool:
        """True when the method needs the full-precision chain (QEP and FADE)."""
        return self.propagation is not None

    @property
    def cross_fitting_halves(self) -> int:
        """Statistics kept per calibration half: 2 for FADE's cross-fitting, else 1."""
        return 2 if self.propagation == "fade" else 1


# Base solvers and their error-propagating variants (docs/methods.md):
#   rtn, gptq        quantize W on the quantized chain's inputs
#   awq, awq-gptq    activation-aware input-channel scales, then RTN / GPTQ
#   qep, qep-rtn, qep-awq   W*(alpha) = W + alpha W G (H + lq I)^-1 with one global alpha, then GPTQ / RTN / AWQ
#   fade, fade-rtn   like qep / qep-rtn with a per-layer alpha chosen from diagnostics
METHODS = {method.name: method for method in (
    Method("rtn", None, "rtn"),
    Method("gptq", None, "gptq"),
    Method("awq", None, "rtn", input_scale=True),
    Method("awq-gptq", None, "gptq", input_scale=True),
    Method("qep", "qep", "gptq"),
    Method("qep-rtn", "qep", "rtn"),
    Method("qep-awq", "qep", "rtn", input_scale=True),
    Method("fade", "fade", "gptq", clip="hessian"),
    Method("fade-rtn", "fade", "rtn"),
)}
SUPPORTED_METHODS = tuple(METHODS)
PROPAGATING_METHODS = tuple(name for name, method in METHODS.items() if method.propagates)
# Checkpoint formats other tools load that `fade export` writes (fade_kernels.io.export).
EXPORT_FORMATS = ("compressed-tensors", "gptq")
# Formats of the tied output projection / token embedding (fade_kernels/nn/head.py).
HEAD_FORMATS = ("fp32", "bf16", "bits8", "bits4")
# Columns per scale of a bits4/bits8 head. 32 rather than 64: on tiny.en (FADE w4, 283 evaluation
# utterances) a 4-bit head cost 0.46 WER points at g32 and 1.01 at g64, for 0.8 MiB more.
DEFAULT_HEAD_GROUP_SIZE = 32
# How a bits4/bits8 head gets its codes: round to nearest, or GPTQ on the head's input statistics
# measured on the quantized model (pipeline/head_calibration.py). GPTQ is the default: on tiny.en
# (FADE w4, 4-bit g32 head, 283 evaluation utterances) WER 15.54 / 15.94 / 19.85 over three
# seeds against 16.34 / 19.27 / 17.19 rounded (fp32 head: 15.88 / 16.0 / 14.7); the 19.85 is two
# repetition loops (124 of its 649 word errors).
HEAD_SOLVERS = ("rtn", "gptq")
# Which linear groups a mixed-precision budget upgrades (pipeline/bit_allocation.py).
AVG_BITS_RULES = ("sensitivity", "random")
# How each group's grid range is chosen (solver/grid.py): min-max, or a clipping search.
CLIP_METHODS = ("minmax", "mse", "hessian")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear layers are quantized.

    bits: code width (2, 3, 4 or 8). group_size: input columns sharing one scale/zero
    (32, 64, 128, or -1 for one group per output row). sym: symmetric grid (zero fixed at
    2^(bits-1)); asymmetric is the default because at 3 bits a symmetric grid wastes a level.
    act_order: GPTQ visits columns by decreasing Hessian diagonal, with static groups.
    block_size: GPTQ lazy-update block width. damp: GPTQ damping as a fraction of mean diag H.
    alpha: QEP's global propagation strength in [0, 1] (qep* methods).
    qep_damp: QEP's ridge lambda_q as a fraction of mean diag H-hat (1.0 as in the QEP paper's code).
    qep_exclude: layer roles/names that get alpha = 0 under QEP; "mlp_out" is each family's MLP
    output projection (Whisper fc2), as in the QEP reference defaults.
    fade_rule: FADE's alpha rule: "both" (reliability + vulnerability, the default) or an
    ablation that keeps one of the two terms.
    awq_grid: number of AWQ exponents searched in [0, 1).
    head: storage of the output projection and the token embedding tied to it (nn/head.py):
    "fp32" (unchanged), "bf16", "bits8" or "bits4" (asymmetric, groups of head_group_size
    columns). Applied after the linears are quantized. head_solver: how a bits4/bits8 head gets
    its codes: "gptq" (the default: on the head's input statistics, measured on the quantized
    model; pipeline/head_calibration.py) or "rtn" (round to nearest).
    clip: each group's grid range: "minmax" (the group's min and max), or the shrunk range with
    the least rounding error, unweighted ("mse") or weighted by the input Hessian's diagonal
    ("hessian"); used by the RTN and GPTQ solvers, hence by QEP and FADE too. None (the
    default) takes the method's own (Method.clip: "hessian" for fade, "minmax" otherwise).
    skip_modules: glob patterns (fnmatch) of linear layers kept in full precision, matched against
    the full module name, e.g. "model.decoder.layers.*.fc2" or "*.encoder_attn.*"; each pattern
    must match at least one quantizable layer of the model.
    avg_bits: mixed precision under a budget (pipeline/bit_allocation.py): the mean storage of the
    quantized weights in bits per weight, scales and zero points included; the most sensitive
    linear groups get the next wider grid (`wider_bits(bits)`) while the mean stays within it.
    None (the default): every layer at `bits`. avg_bits_rule: which groups get the wider grid:
    "sensitivity" (the default, by rounding error per stored bit) or "random" (a control: groups
    in a random order drawn from torch's generator, the same budget).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    block_size: int = 128
    damp: float = 0.01
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    alpha: float = 0.5
    qep_damp: float = 1.0
    qep_exclude: tuple[str, ...] = ("mlp_out",)
    fade_rule: str = "both"
    awq_grid: int = 20
    head: str = "fp32"
    head_group_size: int = DEFAULT_HEAD_GROUP_SIZE
    head_solver: str = "gptq"
    clip: str | None = None
    avg_bits: float | None = None
    avg_bits_rule: str = "sensitivity"

    @property
    def spec(self) -> Method:
        """The decoded method (propagation, base solver, AWQ scales): METHODS[self.method]."""
        return METHODS[self.method]

    @property
    def propagates(self) -> bool:
        """True when the method runs the full-precision chain (QEP and FADE)."""
        return self.spec.propagates

    def __post_init__(self) -> None:
        validate_grid_args(self.bits, self.group_size)
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"method must be one of {SUPPORTED_METHODS}, got {self.method!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not (0.0 <= self.damp < 1.0):
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.qep_damp > 0.0:
            raise ValueError(f"qep_damp must be positive, got {self.qep_damp!r}")
        if self.fade_rule not in FADE_RULES:
            raise ValueError(f"fade_rule must be one of {FADE_RULES}, got {self.fade_rule!r}")
        if self.clip is None:
            object.__setattr__(self, "clip", self.spec.clip)
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}, got {self.clip!r}")
        if not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise ValueError(f"awq_grid must be a positive integer, got {self.awq_grid!r}")
        if self.head not in HEAD_FORMATS:
            raise ValueError(f"head must be one of {HEAD_FORMATS}, got {self.head!r}")
        if self.head_group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"head_group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.head_group_size!r}")
        if self.head_solver not in HEAD_SOLVERS:
            raise ValueError(f"head_solver must be one of {HEAD_SOLVERS}, got {self.head_solver!r}")
        if isinstance(self.skip_modules, str) or not all(
                isinstance(p, str) and p.strip() for p in self.skip_modules):
            raise ValueError(f"skip_modules must be a sequence of non-empty module-name patterns, "
                             f"got {self.skip_modules!r}")
        if self.avg_bits_rule not in AVG_BITS_RULES:
            raise ValueError(f"avg_bits_rule must be one of {AVG_BITS_RULES}, got {self.avg_bits_rule!r}")
        if self.avg_bits is not None:
            if wider_bits(self.bits) is None:
                raise ValueError(f"avg_bits needs a bits value with a wider grid above it ({SUPPORTED_BITS}), "
                                 f"got bits {self.bits}")
            if not isinstance(self.avg_bits, (int, float)) or not self.avg_bits > self.bits:
                raise ValueError(f"avg_bits must be a number above bits ({self.bits}), got {self.avg_bits!r}")
        object.__setattr__(self, "qep_exclude", tuple(self.qep_exclude))
        object.__setattr__(self, "skip_modules", tuple(p.strip() for p in self.skip_modules))

    def without_calibration_data(self) -> "QuantConfig":
        """This config for a run calibrated on silence (a data-free method without a manifest):
        a bits4/bits8 head is rounded to nearest, since GPTQ statistics of silence say nothing."""
        return replace(self, head_solver="rtn") if self.head_solver == "gptq" else self

    def with_bits(self, bits: int) -> "QuantConfig":
        """This config for a group solved at another width (a mixed-precision plan's choice)."""
        return self if bits == self.bits else replace(self, bits=bits, avg_bits=None)

    def skips(self, module_name: str) -> bool:
        """True when `module_name` (a full name from model.named_modules()) stays in full precision."""
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.skip_modules)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skip_modules"] = list(self.skip_modules)
        out["qep_exclude"] = list(self.qep_exclude)
        return out


def wider_bits(bits: int) -> int | None:
    """The next supported width above `bits` (what mixed precision upgrades to), or None."""
    return next((b for b in SUPPORTED_BITS if b > bits), None)


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
