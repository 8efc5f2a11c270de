"""quantize_model: orchestration of the block-by-block pipeline (background §4, §7).

Lifecycle, per stack (encoder first, then decoder):
  1. capture the first block's inputs for every calibration batch (a hook stops the forward);
  2. per block, per true-sequential group: run the block over all batches with a Hessian hook
     on the group's shared input (masked rows dropped), solve the group with RTN or GPTQ
     (stacked weights, one sweep), and write the dequantized weights into the live block so
     the next group sees the quantized upstream;
  3. run the quantized block once more to produce the next block's inputs;
  4. swap the block's solved nn.Linear for QuantLinear (packed codes) and, with a resume
     folder, checkpoint the block and the next inputs (calib/resume.py).
The decoder's cross-attention reads the quantized encoder's output.

Memory. Resident: the model, the current block's full-precision twin (QEP/FADE), the activation
caches (each chain's next inputs per batch, the encoder outputs, the twin's group inputs of the
current block) and one group's statistics. The caches go through calib/cache.py's
ActivationCache: with max_memory they stay in RAM up to that budget and are memory-mapped from
files beyond it. Model weights are never copied wholesale: no .to()/.float()/clone() of the
model, only the current block is deep-copied (its twin) and written (dequantized weights, COW
pages when the weights are memory-mapped), and each finished block is packed at once, dropping
its dense weights and, when they were memory-mapped, giving their pages back (calib/mapped.py:
otherwise every page read stays resident, since one mapping holds the whole file). Within a
block, the outputs of solved linears, attention modules and activation functions are kept (up to
MEMO_BUDGET_BYTES) and replayed by the block's later passes (_QuantizedOutputMemo), so each block
runs its linears and its attention once. transformers' from_pretrained memory-maps float32
safetensors files (5.x, copy-on-write), so blocks not yet processed stay file-backed pages the
kernel can evict; a float16 checkpoint loaded as float32 is necessarily converted into RAM at load
time. During the run, freed buffers stay in the process for reuse (calib/heap.py): the resident
set stays at its high-water mark, and large temporaries are not faulted in again page by page.
"""
from __future__ import annotations

import contextlib
import copy
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.cache import ActivationCache, CachedTensor, load, materialize, parse_size
from fade_kernels.calib.capture import GramAccumulator, StopForward, capture_block_inputs, run_block
from fade_kernels.calib.heap import retain_freed_memory
from fade_kernels.calib.mapped import release_file_pages
from fade_kernels.calib.resume import ResumeMismatchError, ResumeState, SavedState, run_fingerprint
from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig
from fade_kernels.models.adapters import ENCODER_FRAMES, OWN_TOKENS, ModelAdapter, get_adapter
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.solver.fade import (GramStats, choose_alpha, cross_fitted_coefficients, grid_noise_curve,
                                     output_error_vs_full_precision, relative_output_error,
                                     residual_coefficients)
from fade_kernels.solver.gptq import GPTQFactor, gptq_quantize, prepare_gptq_factor
from fade_kernels.solver.qep import corrected_weight, qep_correction
from fade_kernels.solver.grid import expand_groups
from fade_kernels.solver.rtn import rtn_quantize


@dataclass
class LayerReport:
    """Diagnostics of one quantized linear layer, all measured on the calibration rows.

    rel_output_error: local error sqrt(tr(dW H dW^T) / tr(W H W^T)) with dW = W - W_hat and H the
      quantized chain's input Gram matrix (what GPTQ minimises).
    The fields below need the full-precision chain (QEP/FADE, or track_fp_error=True); else None:
    rel_error_fp: ||W X - W_hat X_hat|| / ||W X||, the error against the full-precision output.
    rel_error_fp_uncorrected: the same for the alpha = 0 solution (plain GPTQ/RTN of W), i.e.
      "before" the correction; equals rel_error_fp when alpha = 0.
    propagated_error: ||W delta|| / ||W X||, the upstream error this layer inherits (delta = X - X_hat).
    alpha: propagation strength used; rho: FADE's cross-fitted reliability in [0, 1];
    vulnerability: FADE's grid-noise term q(alpha) / q(0) at the chosen alpha (1.0 at alpha = 0).
    """

    name: str
    shape: tuple[int, int]
    rel_output_error: float
    valid_row_fraction: float
    stack: str = ""
    block: int = -1
    rel_error_fp: float | None = None
    rel_error_fp_uncorrected: float | None = None
    propagated_error: float | None = None
    alpha: float | None = None
    rho: float | None = None
    vulnerability: float | None = None


@dataclass
class QuantizationReport:
    """config: QuantConfig.to_dict(); layers in solve order; seconds: wall time of this call;
    peak_rss_mb: process-lifetime peak RSS; stage_seconds: exclusive seconds per pipeline stage
    (StageTimer.STAGES); resumed_blocks: blocks restored from a resume folder instead of being
    quantized by this call; offloaded_mb: activation cache bytes written to disk (max_memory);
    released_mb: pages of memory-mapped dense weights handed back after their blocks were packed."""

    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    n_calib: int = 0
    stage_seconds: dict = field(default_factory=dict)
    resumed_blocks: int = 0
    offloaded_mb: float = 0.0
    released_mb: float = 0.0

    def summary(self) -> str:
        errors = [layer.rel_output_error for layer in self.layers]
        mean = sum(errors) / max(len(errors), 1)
        lines = [f"quantized {len(self.layers)} linear layers with {self.config['method']} "
                 f"{self.config['bits']}-bit g{self.config['group_size']} on {self.n_calib} utterances "
                 f"in {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB",
                 f"relative output error: mean {mean:.4f}, max {max(errors, default=0):.4f}"]
        fp_errors = [layer.rel_error_fp for layer in self.layers if layer.rel_error_fp is not None]
        if fp_errors:
            lines.append(f"error against the full-precision output: mean {sum(fp_errors) / len(fp_errors):.4f}, "
                         f"last layer {fp_errors[-1]:.4f}")
        alphas = [layer.alpha for layer in self.layers if layer.alpha is not None]
        if alphas:
            lines.append(f"alpha: mean {sum(alphas) / len(alphas):.3f}, min {min(alphas):.3f}, max {max(alphas):.3f}")
        timed = {name: value for name, value in self.stage_seconds.items() if value >= 0.05}
        if timed:
            lines.append("seconds per stage: " + ", ".join(f"{name} {value:.1f}" for name, value in timed.items()))
        if self.resumed_blocks:
            lines.append(f"resumed: {self.resumed_blocks} blocks restored from the resume folder")
        if self.offloaded_mb:
            lines.append(f"activation caches offloaded to disk: {self.offloaded_mb:.0f} MB written")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (config, seconds, peak_rss_mb, n_calib, layers as dicts)."""
        return {"config": self.config, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "n_calib": self.n_calib, "stage_seconds": dict(self.stage_seconds),
                "resumed_blocks": self.resumed_blocks, "offloaded_mb": self.offloaded_mb,
                "released_mb": self.released_mb, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationReport":
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])]
        return cls(config=data["config"], layers=layers, seconds=data.get("seconds", 0.0),
                   peak_rss_mb=data.get("peak_rss_mb", 0.0), n_calib=data.get("n_calib", 0),
                   stage_seconds=dict(data.get("stage_seconds", {})), resumed_blocks=data.get("resumed_blocks", 0),
                   offloaded_mb=data.get("offloaded_mb", 0.0), released_mb=data.get("released_mb", 0.0))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class LayerSolution:
    """One layer's result: codes int32 (N, K), scales float32 (N, G), zeros int32 (N, G);
    input_scale float32 (K,) or None (AWQ: the codes quantize W diag(s), the input must be divided
    by s); diagnostics for the report."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    input_scale: torch.Tensor | None = None
    alpha: float | None = None
    rho: float | None = None
    vulnerability: float | None = None
    target: torch.Tensor | None = None  # the weight the base solver quantized (W, or W + alpha C), (N, K)
    uncorrected: torch.Tensor | None = None  # FADE: the dequantized alpha = 0 solution (N, K), for "before"


def _gptq_factor(stats: GramStats, config: QuantConfig, factor_cache: dict) -> GPTQFactor:
    """GPTQ's factor of the group's Hessian, built once per (damp, act_order) and kept in factor_cache."""
    key = (config.damp, config.act_order)
    if key not in factor_cache:
        factor_cache[key] = prepare_gptq_factor(stats.hessian, config.damp, config.act_order)
    return factor_cache[key]


def _base_solve(stacked: torch.Tensor, stats: GramStats, act_mean_abs: torch.Tensor | None, config: QuantConfig,
                allow_input_scale: bool, factor_cache: dict):
    """Quantize the stacked weight float32 (N, K) with the config's base solver.

    allow_input_scale: False where the group's input cannot be rescaled (AWQ then falls back to
    its plain solver). factor_cache: GPTQ factors of stats.hessian already built (filled here).
    Returns (codes, scales, zeros, input_scale or None)."""
    solver = config.base_solver
    if solver.startswith("awq") and (not allow_input_scale or act_mean_abs is None):
        solver = "gptq" if config.method == "awq-gptq" else "rtn"
    if solver == "rtn":
        codes, scales, zeros = rtn_quantize(stacked, config.bits, config.group_size, config.sym, config.clip,
                                            torch.diagonal(stats.hessian) if config.clip == "hessian" else None)
        return codes, scales, zeros, None
    if solver == "gptq":
        result = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                               act_order=config.act_order, block_size=config.block_size, damp=config.damp,
                               prepared=_gptq_factor(stats, config, factor_cache), clip=config.clip)
        return result.codes, result.scales, result.zeros, None
    from fade_kernels.solver.awq import awq_quantize

    then = "gptq" if config.method == "awq-gptq" else "rtn"
    kwargs = dict(act_order=config.act_order, block_size=config.block_size, damp=config.damp) if then == "gptq" else {}
    codes, scales, zeros, input_scale, _ = awq_quantize(
        stacked, stats.hessian, act_mean_abs, config.bits, config.group_size, config.sym, n_grid=config.awq_grid,
        solver=then, **kwargs)
    return codes, scales, zeros, input_scale


def _local_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row tr(dW H dW^T), float64 (N,)."""
    delta = weight.float() - weight_hat
    return ((delta @ hessian) * delta).sum(dim=1).double()


def solve_linear_group(weights: list[torch.Tensor], stats: GramStats | torch.Tensor, config: QuantConfig,
                       half_stats: tuple[GramStats, GramStats] | None = None, act_mean_abs: torch.Tensor | None = None,
                       excluded: list[bool] | None = None, allow_input_scale: bool = True,
                       factor_cache: dict | None = None) -> list[LayerSolution]:
    """Quantize linears sharing one input.

    weights: float (N_i, K) each, the full-precision weights. stats: the group's GramStats (or a
    float32 (K, K) Hessian for the plain methods). half_stats: FADE's cross-fitting halves.
    act_mean_abs: float32 (K,) mean |x| per input channel (AWQ). excluded: per layer, True when
    QEP must leave it uncorrected (alpha = 0). allow_input_scale: whether AWQ may rescale the
    group's input. factor_cache: a dict kept by the caller for every group with this very Hessian
    (decoder cross-attention k/v all read the encoder output): GPTQ's factor is built once and reused.
    Returns one LayerSolution per layer.
    """
    factor_cache = {} if factor_cache is None else factor_cache
    if isinstance(stats, torch.Tensor):
        stats = GramStats(stats, None, None, 0)
    sizes = [w.shape[0] for w in weights]
    stacked = torch.cat([w.detach().float() for w in weights], 0)
    layer_alphas, rhos, vulns = [None] * len(weights), [None] * len(weights), [None] * len(weights)
    uncorrected = None
    if config.propagates:
        if stats.cross is None:
            raise ValueError(f"method {config.method!r} needs the full-precision chain's statistics (G, D)")
        correction = qep_correction(stacked, stats.hessian, stats.cross, config.qep_damp)
        excluded = excluded or [False] * len(weights)
        if config.method.startswith("qep"):
            layer_alphas = [0.0 if skip else config.alpha for skip in excluded]
        else:
            layer_alphas, rhos, vulns, uncorrected = _fade_alphas(stacked, sizes, correction, stats, half_stats, config,
                                                                  factor_cache)
        row_alpha = torch.cat([torch.full((n,), a) for n, a in zip(sizes, layer_alphas)])
        target = corrected_weight(stacked, correction, row_alpha)
    else:
        target = stacked
    codes, scales, zeros, input_scale = _base_solve(target, stats, act_mean_abs, config, allow_input_scale, factor_cache)
    uncorrected = uncorrected.split(sizes) if uncorrected is not None else [None] * len(sizes)
    out = []
    for index, (c, sc, z, t) in enumerate(zip(codes.split(sizes), scales.split(sizes), zeros.split(sizes),
                                              target.split(sizes))):
        out.append(LayerSolution(c, sc, z, input_scale, layer_alphas[index], rhos[index], vulns[index], t,
                                 uncorrected[index]))
    return out


def _fade_alphas(stacked, sizes, correction, stats: GramStats, half_stats, config: QuantConfig, factor_cache: dict):
    """FADE's per-layer alpha (background §6) for the layers stacked in `stacked` (N, K).

    Returns (alphas, rhos, vulnerabilities) per layer and the dequantized alpha = 0 solution (N, K)."""
    if half_stats is None:
        raise ValueError("FADE needs the statistics of both calibration halves")
    half_a, half_b = half_stats
    cross_fitted = cross_fitted_coefficients(stacked, half_a, half_b, config.qep_damp)
    in_sample = residual_coefficients(stacked, correction, stats)
    noise = grid_noise_curve(stacked, correction, stats.hessian, config.bits, config.group_size, config.sym)
    width = stacked.shape[1]
    rtn0 = _dequantized(*rtn_quantize(stacked, config.bits, config.group_size, config.sym), width)
    uncorrected = rtn0
    if config.base_solver == "gptq":
        # GPTQ removes part of the grid noise; measure how much once, at alpha = 0, per layer.
        gptq0 = gptq_quantize(stacked, stats.hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                              act_order=config.act_order, block_size=config.block_size, damp=config.damp,
                              prepared=_gptq_factor(stats, config, factor_cache), clip=config.clip)
        uncorrected = _dequantized(gptq0.codes, gptq0.scales, gptq0.zeros, width)
        err_gptq = _local_error(stacked, uncorrected, stats.hessian)
        err_rtn = _local_error(stacked, rtn0, stats.hessian)
    alphas, rhos, vulns = [], [], []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        kappa = 1.0
        if config.base_solver == "gptq":
            kappa = float(err_gptq[rows].sum() / err_rtn[rows].sum().clamp(min=1e-30))
        choice = choose_alpha(cross_fitted[:, rows].sum(dim=1), in_sample[:, rows].sum(dim=1),
                              noise[:, rows].sum(dim=1), kappa, config.fade_rule)
        alphas.append(choice.alpha)
        rhos.append(choice.rho)
        vulns.append(choice.vulnerability)
    return alphas, rhos, vulns, uncorrected


def _dequantized(codes, scales, zeros, width: int) -> torch.Tensor:
    group = width // scales.shape[1]
    return (codes.float() - expand_groups(zeros.float(), group)) * expand_groups(scales, group)


class StageTimer:
    """Exclusive wall seconds per pipeline stage, accumulated over a run (report.stage_seconds).

    Stages: capture (block-0 inputs), forward (full-precision twin, next inputs, final norm),
    statistics (Gram accumulation passes), factorisation (GPTQ's inverse-Hessian factor), sweep
    (GPTQ column sweep), solve (everything else in the solvers: QEP correction, FADE's alpha, AWQ's
    search, RTN), diagnostics (report errors), packing (QuantLinear.from_codes), checkpoint (resume
    state writes), offload (activation cache writes to disk). A stage timed inside another is
    subtracted from the outer one, so the values add up to the timed total.
    """

    STAGES = ("capture", "forward", "statistics", "factorisation", "sweep", "solve", "diagnostics", "packing",
              "checkpoint", "offload")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._stack: list[list] = []   # [stage, start, seconds of nested stages]

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self._stack.append([stage, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            name, begin, nested = self._stack.pop()
            elapsed = time.perf_counter() - begin
            self.seconds[name] += elapsed - nested
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            with self(stage):
                return fn(*args, **kwargs)
        return timed

    @contextlib.contextmanager
    def gptq_hooks(self):
        """Time GPTQ's factorisation and sweep for the duration of the block.

        The solver stays a pure function without timing arguments: its two module-level callees
        are wrapped here and restored on exit (every caller, AWQ's and FADE's GPTQ included, goes
        through them). Not thread-safe, like any module attribute swap."""
        from fade_kernels.solver import gptq as gptq_module

        originals = {"inverse_cholesky_upper": gptq_module.inverse_cholesky_upper,
                     "gptq_sweep": gptq_module.gptq_sweep}
        gptq_module.inverse_cholesky_upper = self.wrap("factorisation", originals["inverse_cholesky_upper"])
        gptq_module.gptq_sweep = self.wrap("sweep", originals["gptq_sweep"])
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(gptq_module, name, fn)


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a module output (a tensor, or a tuple / list holding some)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


class _QuantizedOutputMemo:
    """Outputs of a block's already-quantized linears, per calibration batch, replayed by later passes.

    Each group's statistics pass re-runs the block up to that group's input, and the block's final
    pass runs it whole. Linears solved earlier in the block see the same input in every later
    pass (everything upstream is fixed and the call is the same), so their output is computed once
    and reused. Three more kinds of output are replayed the same way, all identical to recomputing:
    - a submodule whose linears are all solved (an attention module once q/k/v and out_proj are):
      its whole output, attention included;
    - a submodule without parameters or buffers (an activation function) called on a replayed
      output of the same batch (the same tensor object): a pure function of a fixed input;
    - the attention module in the pass that collects its last linear's input (out_proj's): that
      pass lets the module finish with a placeholder for out_proj's output (`stub`) and records the
      module's output with the placeholder in it and out_proj's input (`defer`). Once out_proj is
      solved, the module's output is that record with out_proj(input) put in, so attention runs
      once per block instead of twice. Only done when the module returns out_proj's output
      untouched (the same object, unmodified) and nothing else but None beside it.
    Entries beyond `budget_bytes` are not kept (those outputs are recomputed). Install after the
    block's full-precision twin is copied (a deep copy would carry the wrapped forwards) and close
    before packing.

    Usage: memo.batch = batch index before each block call; memo.fix(names) once a group is
    solved; memo.invalidate(name) when a solved linear is changed again (AWQ's scale folding);
    memo.storing = False before the block's last pass, whose new outputs nothing would replay."""

    def __init__(self, block: nn.Module, names: list[str], budget_bytes: int):
        self.modules = {name: block.get_submodule(name) for name in names}
        # Submodules (not the block) whose every nn.Linear is one of `names`: name -> their linears.
        self.containers: dict[str, set[str]] = {}
        self.pure: set[str] = set()
        for name, module in block.named_modules():
            if not name or name in self.modules:
                continue
            linears = {f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, nn.Linear)}
            if linears and linears <= set(names):
                self.containers[name] = linears
                self.modules[name] = module
            elif next(module.parameters(), None) is None and next(module.buffers(), None) is None:
                self.pure.add(name)
                self.modules[name] = module
        self.budget_bytes, self.stored_bytes = budget_bytes, 0
        self.fixed: set[str] = set()
        # (name, batch) -> (output, its bytes, input): input is the call's input for pure modules, else None.
        self.outputs: dict[tuple[str, int], tuple] = {}
        # (container, batch) -> (output with the placeholder, its position, linear name, linear input, bytes)
        self.deferred: dict[tuple[str, int], tuple] = {}
        self.batch: int | None = None
        self.storing = True
        self.stub: str | None = None          # linear answering with a placeholder (see stub_container)
        self.stub_call: tuple | None = None   # (placeholder, the linear's input) of the last stub call
        for name, module in self.modules.items():
            # An instance attribute shadows the class forward; close() deletes it again.
            module.forward = self._memo_forward(name, module, module.forward)

    def _store(self, key, output, input_=None) -> None:
        size = _tensor_bytes(output)
        if self.storing and key not in self.outputs and self.stored_bytes + size <= self.budget_bytes:
            self.outputs[key] = (output, size, input_)
            self.stored_bytes += size

    def _drop(self, key) -> None:
        entry = self.outputs.pop(key, None)
        if entry is not None:
            self.stored_bytes -= entry[1]

    def _is_replayed(self, tensor) -> bool:
        return any(entry[0] is tensor for (_, batch), entry in self.outputs.items() if batch == self.batch)

    def _memo_forward(self, name: str, module: nn.Module, forward):
        def memo_forward(*args, **kwargs):
            if self.batch is None:
                return forward(*args, **kwargs)
            key = (name, self.batch)
            if name == self.stub:
                # out_features wide like the real output; its values are never read (see defer).
                placeholder = args[0].new_empty(*args[0].shape[:-1], module.out_features)
                self.stub_call = (placeholder, args[0])
                return placeholder
            if name in self.pure:
                hit = self.outputs.get(key)
                if hit is not None and len(args) == 1 and not kwargs and hit[2] is args[0]:
                    return hit[0]
                out = forward(*args, **kwargs)
                if len(args) == 1 and not kwargs and self._is_replayed(args[0]):
                    self._store(key, out, args[0])
                return out
            if name not in self.fixed:
                return forward(*args, **kwargs)
            hit = self.outputs.get(key)
            if hit is not None:
                return hit[0]
            if key in self.deferred:
                out = self._resolve(key)
            else:
                out = forward(*args, **kwargs)
            self._store(key, out)
            if name in self.containers and key in self.outputs:
                # The container now answers for its linears: their outputs are never asked for again.
                for linear in self.containers[name]:
                    self._drop((linear, self.batch))
            return out
        return memo_forward

    def stub_container(self, names) -> str | None:
        """The container that solving `names` (one linear) completes, when there is one: set
        self.stub to that linear for the statistics pass and return the container's name."""
        if len(names) != 1:
            return None
        for container, linears in self.containers.items():
            if names[0] in linears and linears - self.fixed == {names[0]}:
                self.stub = names[0]
                return container
        return None

    def defer(self, container: str, output) -> None:
        """Record the stub pass's container output (holding the placeholder) for later resolution."""
        if self.stub_call is None:
            return
        placeholder, linear_input = self.stub_call
        self.stub_call = None
        if output is placeholder:
            position = None
        elif type(output) in (tuple, list) and sum(item is placeholder for item in output) == 1 and all(
                item is placeholder or item is None for item in output):
            position = next(i for i, item in enumerate(output) if item is placeholder)
        else:
            return   # the container did more with the linear's output: recompute it later
        size = _tensor_bytes(linear_input)
        if placeholder._version or not self.storing or self.stored_bytes + size > self.budget_bytes:
            return   # written to in place, or no room
        self.deferred[(container, self.batch)] = (output, position, self.stub, linear_input, size)
        self.stored_bytes += size

    def _pop_deferred(self, key) -> tuple:
        entry = self.deferred.pop(key)
        self.stored_bytes -= entry[4]
        return entry

    def _resolve(self, key):
        output, position, linear, linear_input, _ = self._pop_deferred(key)
        result = self.modules[linear](linear_input)   # the solved linear, through its own memo
        if position is None:
            return result
        return type(output)(result if i == position else item for i, item in enumerate(output))

    def fix(self, names) -> None:
        self.fixed.update(name for name in names if name in self.modules)
        self.fixed.update(name for name, linears in self.containers.items() if linears <= self.fixed)

    def invalidate(self, name: str) -> None:
        """Forget `name`'s outputs and those of every container holding it (recorded or deferred)."""
        stale = {name} | {container for container, linears in self.containers.items() if name in linears}
        for key in [key for key in self.outputs if key[0] in stale]:
            self._drop(key)
        for key in [key for key in self.deferred if key[0] in stale]:
            self._pop_deferred(key)

    def close(self) -> None:
        for module in self.modules.values():
            del module.forward
        self.outputs.clear()
        self.deferred.clear()
        self.stored_bytes = 0


# RAM for _QuantizedOutputMemo (a quarter of max_memory when that is smaller): 16 large-v3
# utterances need ~1 GB to replay every encoder linear.
MEMO_BUDGET_BYTES = 1536 << 20


@dataclass
class _GroupStatistics:
    """One input group's statistics as the solvers read them (see GramAccumulator).

    stats: all calibration rows; half_stats: FADE's cross-fitting halves (or None); act_mean_abs
    float32 (K,); valid_fraction: kept rows / all rows; rows: the (x_hat, delta or None) rows
    themselves when there are no more than K of them (GramAccumulator.kept_rows), for cheaper
    output errors; factor_cache: GPTQ factors of stats.hessian."""

    stats: GramStats
    half_stats: tuple[GramStats, GramStats] | None
    act_mean_abs: torch.Tensor
    valid_fraction: float
    rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
    factor_cache: dict = field(default_factory=dict)


class _StackQuantizer:
    """Runs steps 2-4 of the lifecycle over one stack's blocks, on one or two chains.

    Block call kwargs hold their activations ("hidden_states", and the decoder's
    "encoder_hidden_states") as CachedTensor entries of `cache`, which keeps them in RAM or on
    disk; the full-precision twin's group inputs go through the same cache.
    on_block_done(stack_name, index, block, layer_names, calls, fp_calls) runs after each block
    is packed (the resume checkpoint).

    Decoder cross-attention k/v read the encoder output, the same tensor in every decoder block:
    their statistics and GPTQ factor are computed in the first decoder block and reused by the
    others (exactly what each block would recompute), once the first block has checked that the
    group's input really is the encoder output."""

    def __init__(self, config: QuantConfig, report: QuantizationReport, progress: bool, track_fp: bool,
                 cache: ActivationCache | None = None, timer: StageTimer | None = None, on_block_done=None):
        self.config, self.report, self.progress = config, report, progress
        self.track_fp = track_fp
        self.n_halves = 2 if config.method.startswith("fade") else 1
        self.cache = cache if cache is not None else ActivationCache()
        self.timer = timer if timer is not None else StageTimer()
        self.on_block_done = on_block_done
        self.solved: dict[str, list] = {}   # the current block's solutions: full name -> [codes, scales, zeros]
        self.quantized: list[str] = []      # every packed layer, in solve order
        # (stack, group names) -> _GroupStatistics of a group whose input is the encoder output.
        self.shared_inputs: dict[tuple, _GroupStatistics] = {}
        budget = self.cache.max_bytes
        self.memo_budget = MEMO_BUDGET_BYTES if budget is None else min(MEMO_BUDGET_BYTES, budget // 4)
        self.memo: _QuantizedOutputMemo | None = None

    def put(self, tensor: torch.Tensor, replaces: CachedTensor | None = None) -> CachedTensor:
        with self.timer("offload"):
            return self.cache.put(tensor, replaces)

    def run(self, stack_name: str, layers: nn.ModuleList, layer_prefix: str, groups, calls: list[dict],
            masks: list[dict], halves: list[torch.Tensor], fp_calls: list[dict] | None = None, start: int = 0):
        """calls / fp_calls: per batch, the current block's call kwargs on the quantized / full-precision
        chain (activations as CachedTensor); masks: per batch {own, encoder} bool (B, T); halves: per
        batch int64 (B,) cross-fitting half of each utterance; start: first block to quantize (earlier
        ones were restored by a resumed run). Returns the last block's output entries per batch for
        both chains (the second list is None without the full-precision chain)."""
        bar = tqdm(total=(len(layers) - start) * len(groups), desc=f"{stack_name} blocks", unit="group",
                   disable=not self.progress)
        for index in range(start, len(layers)):
            block = layers[index]
            block_name = f"{layer_prefix}.{index}"
            bar.set_postfix_str(f"block {index + 1}/{len(layers)}")
            fp_rows = None
            if fp_calls is not None:
                # The full-precision twin of this block, run once: its groups' inputs (valid rows
                # only) for G and D, and its output as the next block's full-precision input.
                with self.timer("forward"):
                    fp_rows = self._run_fp_twin(copy.deepcopy(block), groups, fp_calls, masks, stack_name)
            self.memo = _QuantizedOutputMemo(block, [name for group in groups for name in group.names],
                                             self.memo_budget)
            try:
                for group_index, group in enumerate(groups):
                    self._solve_group(block, block_name, group, calls, masks, halves,
                                      None if fp_rows is None else fp_rows[group_index], stack_name, index)
                    self.memo.fix(group.names)
                    if fp_rows is not None:
                        for entry in fp_rows[group_index]:
                            self.cache.release(entry)
                    bar.update(1)
                self.memo.storing = False
                with self.timer("forward"):
                    for batch, call in enumerate(calls):
                        self.memo.batch = batch
                        call["hidden_states"] = self.put(run_block(block, materialize(call)), call["hidden_states"])
            finally:
                self.memo.close()
                self.memo = None
            names = self._pack_block(block, block_name)
            if self.on_block_done is not None:
                self.on_block_done(stack_name, index, block, names, calls, fp_calls)
        bar.close()
        fp_out = None if fp_calls is None else [call["hidden_states"] for call in fp_calls]
        return [call["hidden_states"] for call in calls], fp_out

    def _pack_block(self, block: nn.Module, block_name: str) -> list[str]:
        """Swap the block's solved nn.Linear for QuantLinear now: the block never runs again, and
        its dense weights and int32 codes are freed instead of waiting for the end of the run.
        Returns the swapped names relative to the block, in solve order."""
        config = self.config
        prefix = block_name + "."
        names = [name[len(prefix):] for name in self.solved]
        with self.timer("packing"):
            dense = [block.get_submodule(name).weight.detach() for name in names]
            replace_linears(block, names, lambda name, linear: QuantLinear.from_codes(
                *self.solved[prefix + name], bits=config.bits, group_size=config.group_size,
                bias=None if linear.bias is None else linear.bias.detach(), sym=config.sym))
            # Weights memory-mapped from the checkpoint stay resident after the swap (one mapping
            # holds the whole file): hand their pages back, nothing reads them again.
            self.report.released_mb += release_file_pages(dense) / 1e6
        self.quantized += [prefix + name for name in names]
        self.solved.clear()
        return names

    def _run_fp_twin(self, fp_block: nn.Module, groups, fp_calls: list[dict], masks: list[dict],
                     stack_name: str) -> list[list]:
        rows = [[] for _ in groups]
        current = {}

        def make_hook(group_index, mask_key):
            def hook(module, args):
                x = args[0].detach()
                mask = current[mask_key]
                rows[group_index].append(self.put(x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float()))
            return hook

        # Groups with shared statistics need no rows from this block.
        handles = [fp_block.get_submodule(group.names[0]).register_forward_pre_hook(make_hook(i, group.mask))
                   for i, group in enumerate(groups) if (stack_name, group.names) not in self.shared_inputs]
        try:
            for call, mask in zip(fp_calls, masks):
                current.update(mask)
                call["hidden_states"] = self.put(run_block(fp_block, materialize(call)), call["hidden_states"])
        finally:
            for handle in handles:
                handle.remove()
        return rows

    def _collect_stats(self, block, group, calls, masks, halves, fp_rows) -> tuple[GramAccumulator, bool]:
        """The group's Gram statistics over every batch, and whether its input was the encoder
        output itself in every batch (then any decoder block would give the same statistics)."""
        module = block.get_submodule(group.names[0])
        accumulator = GramAccumulator(module.in_features, with_error=fp_rows is not None, n_halves=self.n_halves)
        current = {}
        reads_encoder_output = group.mask == ENCODER_FRAMES

        def hook(module, args):
            nonlocal reads_encoder_output
            x = args[0].detach()
            if reads_encoder_output:
                encoder_output = current["encoder_output"]
                reads_encoder_output = x is encoder_output or (
                    encoder_output is not None and x.shape == encoder_output.shape and torch.equal(x, encoder_output))
            mask = current["mask"]
            x_hat = x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float()
            delta = None if fp_rows is None else load(fp_rows[current["batch"]]) - x_hat
            half = None
            if self.n_halves == 2:
                half = current["halves"][:, None].expand(mask.shape)[mask]
            accumulator.add(x_hat, delta, half, total_rows=mask.numel())
            if container is None:
                # Nothing after this group's input matters for its statistics: stop the block here.
                raise StopForward

        def after_container(module, args, output):
            self.memo.defer(container, output)
            raise StopForward

        # When this group's linear is the last unsolved one of a container (out_proj of an
        # attention module), the pass runs to the container's end with a placeholder for that
        # linear, so the memo can replay the container later without a second attention.
        container = self.memo.stub_container(group.names) if self.memo is not None else None
        handles = [module.register_forward_pre_hook(hook)]
        if container is not None:
            handles.append(block.get_submodule(container).register_forward_hook(after_container))
        try:
            for batch, (call, mask) in enumerate(zip(calls, masks)):
                kwargs = materialize(call)
                current.update(mask=mask[group.mask], batch=batch, halves=halves[batch],
                               encoder_output=kwargs.get("encoder_hidden_states"))
                if self.memo is not None:
                    self.memo.batch = batch
                try:
                    run_block(block, kwargs)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            if self.memo is not None:
                self.memo.stub = self.memo.stub_call = None
        return accumulator, reads_encoder_output

    def _solve_group(self, block, block_name, group, calls, masks, halves, fp_rows, stack_name, block_index):
        modules = [block.get_submodule(name) for name in group.names]
        width = modules[0].in_features
        shared_key = (stack_name, group.names)
        gathered = self.shared_inputs.get(shared_key)
        if gathered is None:
            with self.timer("statistics"):
                accumulator, reads_encoder_output = self._collect_stats(block, group, calls, masks, halves, fp_rows)
                gathered = _GroupStatistics(
                    accumulator.stats(),
                    (accumulator.half_stats(0), accumulator.half_stats(1)) if self.n_halves == 2 else None,
                    accumulator.act_mean_abs, accumulator.valid_fraction, accumulator.kept_rows())
            if reads_encoder_output:
                self.shared_inputs[shared_key] = gathered
        stats = gathered.stats
        excluded = [group.role in self.config.qep_exclude or name in self.config.qep_exclude
                    or name.rsplit(".", 1)[-1] in self.config.qep_exclude for name in group.names]
        with self.timer("solve"):
            solutions = solve_linear_group([m.weight for m in modules], stats, self.config, gathered.half_stats,
                                           gathered.act_mean_abs, excluded, self._can_rescale(block, group, width),
                                           gathered.factor_cache)
        input_scale = solutions[0].input_scale
        for name, module, solution in zip(group.names, modules, solutions):
            weight_hat = _dequantized(solution.codes, solution.scales, solution.zeros, width)
            if input_scale is not None:
                # The codes represent W diag(s); the model now computes with that weight on x / s.
                effective = weight_hat / input_scale[None, :]
            else:
                effective = weight_hat
            full_name = f"{block_name}.{name}"
            with self.timer("diagnostics"):
                layer_report = LayerReport(
                    full_name, tuple(module.weight.shape),
                    relative_output_error(solution.target, effective, stats.hessian,
                                          None if gathered.rows is None else gathered.rows[0]),
                    gathered.valid_fraction, stack=stack_name, block=block_index, alpha=solution.alpha,
                    rho=solution.rho, vulnerability=solution.vulnerability)
                if stats.cross is not None:
                    fp_error, propagated = output_error_vs_full_precision(module.weight.detach(), effective, stats,
                                                                             gathered.rows)
                    layer_report.rel_error_fp, layer_report.propagated_error = fp_error, propagated
                    if not solution.alpha:
                        layer_report.rel_error_fp_uncorrected = fp_error
                    elif solution.uncorrected is not None:
                        layer_report.rel_error_fp_uncorrected = output_error_vs_full_precision(
                            module.weight.detach(), solution.uncorrected, stats, gathered.rows)[0]
            self.report.layers.append(layer_report)
            # The live block now computes with the quantized weight, so later groups and
            # blocks see the quantized upstream (the quantized chain).
            module.weight.data.copy_(weight_hat.to(module.weight.dtype))
            self.solved[full_name] = [solution.codes, solution.scales, solution.zeros]
        if input_scale is not None:
            self._fold_input_scale(block, block_name, group, input_scale)

    @staticmethod
    def _can_rescale(block, group, width: int) -> bool:
        """Whether the group's input can be divided by AWQ's scales exactly (see LinearGroup.scale_into)."""
        if group.scale_into is None:
            return False
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            return source.weight is not None
        # v_proj rows map one to one onto out_proj inputs only without grouped-query attention.
        return isinstance(source, nn.Linear) and source.out_features == width

    def _fold_input_scale(self, block, block_name, group, input_scale):
        """Divide the group's input by s where that is exact (background: AWQ scales are folded)."""
        if group.scale_into is None:
            raise RuntimeError(f"AWQ produced input scales for {group.names} whose input cannot be rescaled")
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            source.weight.data.div_(input_scale.to(source.weight.dtype))
            if source.bias is not None:
                source.bias.data.div_(input_scale.to(source.bias.dtype))
            return
        # An already-quantized v_proj: its output rows are this group's input channels. Scaling a
        # row scales that row's group scales and keeps the codes; the new scales are rounded to
        # float16 as the checkpoint stores them, and the live weight follows the rounded ones.
        if self.memo is not None:
            self.memo.invalidate(group.scale_into)   # its output changes with its rows
        entry = self.solved[f"{block_name}.{group.scale_into}"]
        entry[1] = (entry[1] / input_scale[:, None]).half().float()
        source.weight.data.copy_(_dequantized(entry[0], entry[1], entry[2], source.in_features).to(source.weight.dtype))
        if source.bias is not None:
            source.bias.data.div_(input_scale.to(source.bias.dtype))


def _batches(samples: list[CalibSample], batch_size: int):
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def _restore_block(block: nn.Module, tensors: dict[str, torch.Tensor], names: list[str], config: QuantConfig) -> None:
    """Put a finished block back as a resumed run saved it: empty QuantLinear at `names`, then
    every tensor of the block's saved state_dict (strict, assigned without a copy)."""
    replace_linears(block, names, lambda name, linear: QuantLinear(
        linear.in_features, linear.out_features, config.bits, config.group_size, bias=linear.bias is not None,
        sym=config.sym))
    block.load_state_dict(tensors, strict=True, assign=True)


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[CalibSample], config: QuantConfig, batch_size: int = 8,
                   adapter: ModelAdapter | None = None, progress: bool = True,
                   track_fp_error: bool | None = None, checkpoint_dir: str | os.PathLike | None = None,
                   keep_checkpoint: bool = False, max_memory: int | str | None = None,
                   offload_dir: str | os.PathLike | None = None, run_info: dict | None = None) -> QuantizationReport:
    """Quantize every encoder and decoder linear layer of `model` in place.

    model: a transformers encoder-decoder ASR model (Whisper, Moonshine) in float32.
    samples: calibration utterances (see calib.prepare_samples); RTN still runs the pipeline
    so the report carries output errors. Returns a QuantizationReport; afterwards every
    solved nn.Linear is a QuantLinear and `model.config.quantization_config` describes them.
    track_fp_error: also run the full-precision chain to report each layer's error against the
    full-precision output (default: only for QEP/FADE, which need that chain anyway; it costs one
    extra forward of each block). FADE's cross-fitting halves are the even and odd positions of
    `samples` (a random subset already, so the split is fixed by the subset's seed).
    checkpoint_dir: resume folder (calib/resume.py). After every block the run's state is written
      there atomically; called again with the same model, samples and settings, the run continues
      after the last finished block with a bit-identical result. A folder holding another run's
      state raises ResumeMismatchError. Deleted at the end unless keep_checkpoint.
    max_memory: RAM budget of the activation caches, bytes or a size such as "4GB" (None: no
      limit). Caches beyond it are written to `offload_dir` (default checkpoint_dir/activations,
      else the system temp dir) and memory-mapped when used; results are identical.
    run_info: JSON-able identification of the run (model spec, manifest, seed) added to the resume
      fingerprint.
    """
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one utterance")
    if config.method.startswith("fade") and len(samples) < 2:
        raise ValueError(f"method {config.method!r} needs at least 2 calibration utterances (one per cross-fitting half), "
                         f"got {len(samples)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    budget = parse_size(max_memory)
    two_chain = config.propagates if track_fp_error is None else (track_fp_error or config.propagates)
    adapter = adapter or get_adapter(model)
    model.eval()
    start = time.perf_counter()
    resume = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(model, samples, config, batch_size, two_chain, type(adapter).__name__, run_info)
        resume = ResumeState(checkpoint_dir, fingerprint)
    if offload_dir is None and resume is not None:
        offload_dir = resume.offload_dir
    cache = ActivationCache(budget, offload_dir)
    timer = StageTimer()
    try:
        with timer.gptq_hooks(), retain_freed_memory():
            report = _quantize(model, samples, config, batch_size, adapter, progress, two_chain, resume, cache, timer)
    finally:
        cache.close()
        if resume is not None:
            resume.close()
    if resume is not None and not keep_checkpoint:
        resume.clear()
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = _peak_rss_mb()
    report.stage_seconds = {name: round(value, 6) for name, value in timer.seconds.items()}
    report.offloaded_mb = cache.spilled_bytes / 1e6
    return report


def _quantize(model, samples, config, batch_size, adapter, progress, two_chain, resume: ResumeState | None,
              cache: ActivationCache, timer: StageTimer) -> QuantizationReport:
    report = QuantizationReport(config=config.to_dict(), n_calib=len(samples))
    encoder, decoder = adapter.encoder(model), adapter.decoder(model)
    enc_layers, dec_layers = adapter.encoder_layers(model), adapter.decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    batches = _batches(samples, batch_size)
    halves = [torch.arange(i, i + len(batch)) % 2 for i, batch in zip(range(0, len(samples), batch_size), batches)]
    put = cache.put

    # A resumed run: finished blocks come back from disk exactly as they were packed.
    saved = resume.load() if resume is not None else None
    stage, next_block = (saved.stage, saved.next_block) if saved else ("encoder", 0)
    quantized = {"encoder": [], "decoder": []}
    if saved:
        report.layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in saved.layers]
        quantized = {stack: [list(block) for block in saved.quantized.get(stack, [])] for stack in quantized}
        with timer("checkpoint"):
            for stack_name, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
                for index, block_names in enumerate(quantized[stack_name]):
                    _restore_block(layers[index], resume.block_tensors(stack_name, index), block_names, config)
        report.resumed_blocks = sum(len(blocks) for blocks in quantized.values())
    encoder_outputs_file = saved.encoder_outputs if saved else None

    def commit(stack_name, index, block, block_names, calls, fp_calls):
        quantized[stack_name].append(block_names)
        if resume is None:
            return
        with timer("checkpoint"):
            state = SavedState(stack_name, index + 1, [asdict(layer) for layer in report.layers], quantized, None,
                               encoder_outputs_file if stack_name == "decoder" else None)
            resume.commit_block(stack_name, index, block.state_dict(), [c["hidden_states"] for c in calls],
                                None if fp_calls is None else [c["hidden_states"] for c in fp_calls], state)

    stack = _StackQuantizer(config, report, progress, two_chain, cache, timer, commit)
    stack.quantized = [f"{names[layers]}.{index}.{name}" for stack_name, layers in (("encoder", enc_layers),
                       ("decoder", dec_layers)) for index, block in enumerate(quantized[stack_name]) for name in block]

    # Encoder: capture block-0 inputs; the mask keeps the frames that carry real audio. (A run
    # resumed past the encoder still needs the masks and the collated inputs.)
    enc_calls, enc_masks, enc_inputs = [], [], []
    for batch in batches:
        inputs = adapter.collate_encoder_inputs(batch)
        enc_inputs.append(inputs)
        with timer("capture"):
            call = capture_block_inputs(enc_layers[0], lambda: encoder(**inputs))
        n_frames = call["hidden_states"].shape[1]
        valid = torch.zeros(len(batch), n_frames, dtype=torch.bool)
        for row, sample in enumerate(batch):
            valid[row, : adapter.encoder_valid_frames(model, sample.n_samples, n_frames)] = True
        enc_masks.append({OWN_TOKENS: valid})
        if stage == "encoder":
            call["hidden_states"] = put(call["hidden_states"])
            enc_calls.append(call)
    final_norm = adapter.encoder_final_norm(model)
    if stage == "encoder":
        # Both chains start from the same (full-precision) stem output, each with its own entry.
        enc_fp_calls = [{**call, "hidden_states": put(load(call["hidden_states"]))} for call in enc_calls] \
            if two_chain else None
        if next_block > 0:
            _replace_hidden_states(resume, saved.activations, cache, enc_calls, enc_fp_calls)
        hidden, fp_hidden = stack.run("encoder", enc_layers, names[enc_layers], adapter.encoder_groups, enc_calls,
                                      enc_masks, halves, enc_fp_calls, start=next_block)
        with timer("forward"):
            encoder_outputs = [put(final_norm(load(entry))) for entry in hidden]
            fp_encoder_outputs = [put(final_norm(load(entry))) for entry in fp_hidden] if two_chain else None
        for entry in hidden + (fp_hidden or []):
            cache.release(entry)
        del enc_calls, enc_fp_calls, hidden, fp_hidden
        if resume is not None:
            with timer("checkpoint"):
                encoder_outputs_file = resume.save_encoder_outputs(encoder_outputs, fp_encoder_outputs)
        next_block = 0
    else:
        with timer("checkpoint"):
            encoder_outputs, fp_encoder_outputs = resume.read_chains(encoder_outputs_file, put)
        if two_chain and fp_encoder_outputs is None:
            raise ResumeMismatchError(f"{resume.dir}: the saved encoder outputs lack the full-precision chain")

    # Decoder: teacher-forced on the transcript tokens, cross-attention on the quantized encoder.
    dec_calls, dec_masks, dec_fp_calls = [], [], []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    for index, (batch, enc_out, enc_mask, inputs) in enumerate(zip(batches, encoder_outputs, enc_masks, enc_inputs)):
        longest = max(len(s.decoder_ids) for s in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        own = torch.zeros(len(batch), longest, dtype=torch.bool)
        for row, sample in enumerate(batch):
            ids[row, : len(sample.decoder_ids)] = sample.decoder_ids
            own[row, : len(sample.decoder_ids)] = True
        # Right padding under a causal mask cannot affect the real positions, so no decoder
        # attention mask is needed; padded rows are only dropped from the statistics.
        kwargs = adapter.decoder_call_kwargs(inputs, enc_mask[OWN_TOKENS])
        with timer("capture"):
            call = capture_block_inputs(dec_layers[0], lambda: decoder(
                input_ids=ids, encoder_hidden_states=load(enc_out), use_cache=False, **kwargs))
        call["hidden_states"] = put(call["hidden_states"])
        call["encoder_hidden_states"] = enc_out
        dec_calls.append(call)
        dec_masks.append({OWN_TOKENS: own, ENCODER_FRAMES: enc_mask[OWN_TOKENS]})
        if two_chain:
            # Same tokens; cross-attention reads the full-precision encoder's output.
            dec_fp_calls.append({**call, "hidden_states": put(load(call["hidden_states"])),
                                 "encoder_hidden_states": fp_encoder_outputs[index]})
    if stage == "decoder" and next_block > 0:
        _replace_hidden_states(resume, saved.activations, cache, dec_calls, dec_fp_calls if two_chain else None)
    hidden, fp_hidden = stack.run("decoder", dec_layers, names[dec_layers], adapter.decoder_groups, dec_calls,
                                  dec_masks, halves, dec_fp_calls if two_chain else None, start=next_block)
    for entry in hidden + (fp_hidden or []) + encoder_outputs + (fp_encoder_outputs or []):
        cache.release(entry)
    model.config.quantization_config = quantization_config_dict(config, stack.quantized)
    return report


def _replace_hidden_states(resume: ResumeState, activations: str, cache: ActivationCache, calls: list[dict],
                           fp_calls: list[dict] | None) -> None:
    """A resumed run: the saved outputs of the last finished block become both chains' inputs."""
    q, fp = resume.read_chains(activations, cache.put)
    if len(q) != len(calls) or (fp_calls is not None and (fp is None or len(fp) != len(fp_calls))):
        raise ResumeMismatchError(f"{resume.dir / activations} does not hold one tensor per batch and chain")
    for chain_calls, entries in ((calls, q), (fp_calls or [], fp or [])):
        for call, entry in zip(chain_calls, entries):
            cache.release(call["hidden_states"])
            call["hidden_states"] = entry


def quantization_config_dict(config: QuantConfig, module_names: list[str]) -> dict:
    """The `quantization_config` stored in config.json for a fade-kernels checkpoint."""
    return {
        "quant_method": "fade", "checkpoint_format": "fade", "method": config.method,
        "bits": config.bits, "group_size": config.group_size, "sym": config.sym, "desc_act": config.act_order,
        "modules": {name: {"bits": config.bits, "group_size": config.group_size, "sym": config.sym}
                    for name in module_names},
    }
