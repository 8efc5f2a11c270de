"""StackQuantizer: the block loop of one stack (encoder or decoder), on one or two chains.

Per block: run the full-precision twin once (QEP/FADE), then per true-sequential group collect
the group's statistics with a hook on its input (masked rows dropped), solve it
(solver/group.py) and write the dequantized weights into the live block, so the next group sees
the quantized upstream; run the quantized block to produce the next block's inputs; pack the
block's linears into QuantLinear; hand the block to the resume checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fade_kernels.calib.capture import StopForward, run_block
from fade_kernels.calib.statistics import GramAccumulator, valid_rows
from fade_kernels.config import QuantConfig
from fade_kernels.memory.cache import ActivationCache, CachedTensor, load, materialize
from fade_kernels.memory.mapped import release_file_pages
from fade_kernels.models.adapters import ENCODER_FRAMES
from fade_kernels.nn.quant_linear import QuantLinear, replace_linears
from fade_kernels.numerics import solving
from fade_kernels.pipeline.memo import MEMO_BUDGET_BYTES, QuantizedOutputMemo
from fade_kernels.pipeline.report import LayerReport, QuantizationReport
from fade_kernels.solver.awq import divide_norm_by_input_scale
from fade_kernels.solver.fade import output_error_vs_full_precision, relative_output_error
from fade_kernels.solver.grid import dequantize_grouped
from fade_kernels.solver.group import solve_linear_group
from fade_kernels.solver.stats import GramStats
from fade_kernels.timing import StageTimer


class PipelineObserver:
    """Read-only views into a run, for tests and diagnostics; every method does nothing here.

    Subclass and pass to quantize_model(observer=...). The objects handed over must not be changed."""

    def statistics_collected(self, block_name: str, group_names: tuple, accumulator: GramAccumulator) -> None:
        """A group's statistics were accumulated (not called for a group whose shared statistics are reused)."""

    def memo_closed(self, block_name: str, memo: QuantizedOutputMemo) -> None:
        """The block's output memo is about to be closed (its replayed outputs still in it)."""

    def block_packed(self, block_name: str, block: nn.Module) -> None:
        """The block's linears were just swapped for QuantLinear."""


@dataclass
class GroupStatistics:
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


class StackQuantizer:
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
                 cache: ActivationCache | None = None, timer: StageTimer | None = None, on_block_done=None,
                 memo_budget: int = MEMO_BUDGET_BYTES, observer: PipelineObserver | None = None,
                 share_encoder_statistics: bool = True, layer_bits: dict[str, int] | None = None):
        self.config, self.report, self.progress = config, report, progress
        self.track_fp = track_fp
        self.n_halves = config.spec.cross_fitting_halves
        self.cache = cache if cache is not None else ActivationCache()
        self.timer = timer if timer is not None else StageTimer()
        self.on_block_done = on_block_done
        self.observer = observer if observer is not None else PipelineObserver()
        self.share_encoder_statistics = share_encoder_statistics
        self.solved: dict[str, list] = {}   # the current block's solutions: full name -> [codes, scales, zeros]
        self.quantized: list[str] = []      # every packed layer, in solve order
        # (stack, group names) -> GroupStatistics of a group whose input is the encoder output.
        self.shared_inputs: dict[tuple, GroupStatistics] = {}
        self.memo_budget = memo_budget
        self.memo: QuantizedOutputMemo | None = None
        self.layer_bits = layer_bits or {}   # a mixed-precision plan: full name -> bits (else config.bits)

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
            self.memo = QuantizedOutputMemo(block, [name for group in groups for name in group.names],
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
                self.observer.memo_closed(block_name, self.memo)
                self.memo.close()
                self.memo = None
            names = self._pack_block(block, block_name)
            self.observer.block_packed(block_name, block)
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
                *self.solved[prefix + name], bits=self.layer_bits.get(prefix + name, config.bits),
                group_size=config.group_size,
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
                rows[group_index].append(self.put(valid_rows(x, mask)))
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
            x_hat = valid_rows(x, mask)
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
        # Layers the config keeps in full precision are left as they are: never solved nor packed.
        names = [name for name in group.names if not self.config.skips(f"{block_name}.{name}")]
        if not names:
            return
        modules = [block.get_submodule(name) for name in names]
        width = modules[0].in_features
        shared_key = (stack_name, group.names)
        gathered = self.shared_inputs.get(shared_key)
        if gathered is None:
            with self.timer("statistics"):
                accumulator, reads_encoder_output = self._collect_stats(block, group, calls, masks, halves, fp_rows)
                self.observer.statistics_collected(block_name, group.names, accumulator)
                gathered = GroupStatistics(
                    accumulator.stats(),
                    (accumulator.half_stats(0), accumulator.half_stats(1)) if self.n_halves == 2 else None,
                    accumulator.act_mean_abs, accumulator.valid_fraction, accumulator.kept_rows())
            if reads_encoder_output and self.share_encoder_statistics:
                self.shared_inputs[shared_key] = gathered
        stats = gathered.stats
        excluded = [group.role in self.config.qep_exclude or name in self.config.qep_exclude
                    or name.rsplit(".", 1)[-1] in self.config.qep_exclude for name in names]
        # AWQ rescales the group's shared input: a full-precision reader of it would see x / s.
        can_rescale = len(names) == len(group.names) and self._can_rescale(block, block_name, group, width)
        widths = {self.layer_bits.get(f"{block_name}.{name}", self.config.bits) for name in names}
        if len(widths) != 1:
            raise ValueError(f"{block_name}: the layers {names} are solved together and need one width, "
                             f"the bit plan gives {sorted(widths)}")
        with self.timer("solve"), solving(", ".join(f"{block_name}.{name}" for name in names)):
            solutions = solve_linear_group([m.weight for m in modules], stats, self.config.with_bits(widths.pop()),
                                           gathered.half_stats,
                                           gathered.act_mean_abs, excluded, can_rescale, gathered.factor_cache)
        input_scale = solutions[0].input_scale
        for name, module, solution in zip(names, modules, solutions):
            weight_hat = dequantize_grouped(solution.codes, solution.scales, solution.zeros)
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

    def _can_rescale(self, block, block_name, group, width: int) -> bool:
        """Whether the group's input can be divided by AWQ's scales exactly (see LinearGroup.scale_into)."""
        if group.scale_into is None:
            return False
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            return source.weight is not None
        # v_proj rows map one to one onto out_proj inputs only without grouped-query attention,
        # and only a solved v_proj has group scales to divide.
        return (isinstance(source, nn.Linear) and source.out_features == width
                and f"{block_name}.{group.scale_into}" in self.solved)

    def _fold_input_scale(self, block, block_name, group, input_scale):
        """Divide the group's input by s where that is exact: the post-step of AWQ's input-channel scales."""
        if group.scale_into is None:
            raise RuntimeError(f"AWQ produced input scales for {group.names} whose input cannot be rescaled")
        source = block.get_submodule(group.scale_into)
        if isinstance(source, nn.LayerNorm):
            divide_norm_by_input_scale(source, input_scale)
            return
        # An already-quantized v_proj: its output rows are this group's input channels. Scaling a
        # row scales that row's group scales and keeps the codes; the new scales are rounded to
        # float16 as the checkpoint stores them, and the live weight follows the rounded ones.
        if self.memo is not None:
            self.memo.invalidate(group.scale_into)   # its output changes with its rows
        entry = self.solved[f"{block_name}.{group.scale_into}"]
        entry[1] = (entry[1] / input_scale[:, None]).half().float()
        source.weight.data.copy_(dequantize_grouped(entry[0], entry[1], entry[2]).to(source.weight.dtype))
        if source.bias is not None:
            source.bias.data.div_(input_scale.to(source.bias.dtype))
