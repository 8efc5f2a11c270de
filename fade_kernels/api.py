"""The public entry point: quantize_model(model, samples, config).

Lifecycle, per stack (encoder first, then decoder; fade_kernels/pipeline/):
  1. capture the first block's inputs for every calibration batch (a hook stops the forward;
     pipeline/inputs.py);
  2. per block, per true-sequential group: run the block over all batches with a hook on the
     group's shared input (masked rows dropped; calib/statistics.py), solve the group
     (solver/group.py: QEP/FADE correction, then RTN/GPTQ/AWQ on the stacked weights, one sweep)
     and write the dequantized weights into the live block so the next group sees the quantized
     upstream (pipeline/stack.py);
  3. run the quantized block once more to produce the next block's inputs;
  4. swap the block's solved nn.Linear for QuantLinear (packed codes) and, with a resume folder,
     checkpoint the block and the next inputs (pipeline/resume.py, pipeline/resume_state.py).
The decoder's cross-attention reads the quantized encoder's output (pipeline/run.py).

Memory. Resident: the model, the current block's full-precision twin (QEP/FADE), the activation
caches (each chain's next inputs per batch, the encoder outputs, the twin's group inputs of the
current block) and one group's statistics. The caches go through memory/cache.py's
ActivationCache: with max_memory they stay in RAM up to that budget and are memory-mapped from
files beyond it. Model weights are never copied wholesale: no .to()/.float()/clone() of the
model, only the current block is deep-copied (its twin) and written (dequantized weights, COW
pages when the weights are memory-mapped), and each finished block is packed at once, dropping
its dense weights and, when they were memory-mapped, giving their pages back (memory/mapped.py:
otherwise every page read stays resident, since one mapping holds the whole file). Within a
block, the outputs of solved linears, attention modules and activation functions are kept (up to
memo_budget) and replayed by the block's later passes (pipeline/memo.py), so each block runs its
linears and its attention once. transformers' from_pretrained memory-maps float32 safetensors
files (5.x, copy-on-write), so blocks not yet processed stay file-backed pages the kernel can
evict; a float16 checkpoint loaded as float32 is necessarily converted into RAM at load time.
During the run, freed buffers stay in the process for reuse (memory/heap.py): the resident set
stays at its high-water mark, and large temporaries are not faulted in again page by page.
"""
from __future__ import annotations

import fnmatch
import os
import time

import torch
from torch import nn

from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig
from fade_kernels.memory.cache import ActivationCache, parse_size
from fade_kernels.memory.heap import retain_freed_memory
from fade_kernels.models.adapters import ModelAdapter, get_adapter
from fade_kernels.pipeline.bit_allocation import average_bits, plan_bits
from fade_kernels.pipeline.memo import MEMO_BUDGET_BYTES
from fade_kernels.pipeline.report import LayerReport, QuantizationReport, peak_rss_mb
from fade_kernels.pipeline.resume_state import ResumeState, run_fingerprint
from fade_kernels.pipeline.run import run_pipeline
from fade_kernels.pipeline.stack import PipelineObserver
from fade_kernels.solver.group import LayerSolution, solve_linear_group
from fade_kernels.timing import StageTimer, timing

__all__ = ["quantize_model", "check_skip_modules", "QuantizationReport", "LayerReport", "LayerSolution", "solve_linear_group",
           "StageTimer", "PipelineObserver", "MEMO_BUDGET_BYTES"]


def check_skip_modules(model: nn.Module, config: QuantConfig, adapter: ModelAdapter | None = None) -> None:
    """Raise a ValueError naming the patterns of config.skip_modules that match none of the model's
    quantizable layers (a typo would otherwise quantize the layer the user meant to keep)."""
    if not config.skip_modules:
        return
    targets = (adapter or get_adapter(model)).quantizable_names(model)
    unmatched = [p for p in config.skip_modules if not any(fnmatch.fnmatchcase(name, p) for name in targets)]
    if unmatched:
        raise ValueError(f"skip_modules patterns {unmatched} match no quantizable layer of this model "
                         f"(full names such as {targets[0]!r})")


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[CalibSample], config: QuantConfig, batch_size: int = 8,
                   adapter: ModelAdapter | None = None, progress: bool = True,
                   track_fp_error: bool | None = None, checkpoint_dir: str | os.PathLike | None = None,
                   keep_checkpoint: bool = False, max_memory: int | str | None = None,
                   offload_dir: str | os.PathLike | None = None, run_info: dict | None = None,
                   memo_budget: int | str | None = None, observer: PipelineObserver | None = None,
                   share_encoder_statistics: bool = True) -> QuantizationReport:
    """Quantize every encoder and decoder linear layer of `model` in place.

    model: a transformers encoder-decoder ASR model (Whisper, Moonshine) in float32.
    samples: calibration utterances (see calib.prepare_samples); RTN still runs the pipeline
    so the report carries output errors. Returns a QuantizationReport; afterwards every
    solved nn.Linear is a QuantLinear and `model.config.quantization_config` describes them.
    track_fp_error: also run the full-precision chain to report each layer's error against the
    full-precision output (default: only for QEP/FADE, which need that chain anyway; it costs one
    extra forward of each block). FADE's cross-fitting halves are the even and odd positions of
    `samples` (a random subset already, so the split is fixed by the subset's seed).
    checkpoint_dir: resume folder (pipeline/resume_state.py). After every block the run's state is written
      there atomically; called again with the same model, samples and settings, the run continues
      after the last finished block with a bit-identical result. A folder holding another run's
      state raises ResumeMismatchError. Deleted at the end unless keep_checkpoint.
    max_memory: RAM budget of the activation caches, bytes or a size such as "4GB" (None: no
      limit). Caches beyond it are written to `offload_dir` (default checkpoint_dir/activations,
      else the system temp dir) and memory-mapped when used; results are identical.
    run_info: JSON-able identification of the run (model spec, manifest, seed) added to the resume
      fingerprint.
    memo_budget: RAM for replaying the outputs of a block's solved layers in the block's later
      passes, bytes or a size (default MEMO_BUDGET_BYTES, at most a quarter of max_memory); 0
      recomputes them. Results are identical for every budget.
    observer: a PipelineObserver that sees each group's statistics, each block's output memo and
      each packed block (tests and diagnostics). share_encoder_statistics: False recomputes the
      decoder cross-attention k/v statistics in every block instead of reusing the first block's
      (identical results; for verification).
    config.skip_modules: layers whose full name matches one of these glob patterns stay nn.Linear
      in full precision; the layers around them are calibrated on their full-precision output.
    config.avg_bits: mixed precision; before the pipeline runs, pipeline/bit_allocation.py picks
      each group's width from the full-precision model and `samples` (report.layer_bits).
    """
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one utterance")
    if config.spec.cross_fitting_halves > len(samples):
        raise ValueError(f"method {config.method!r} needs at least 2 calibration utterances (one per cross-fitting half), "
                         f"got {len(samples)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    budget = parse_size(max_memory)
    memo_bytes = None if memo_budget is None else parse_size(memo_budget, "memo_budget")
    two_chain = config.propagates if track_fp_error is None else (track_fp_error or config.propagates)
    adapter = adapter or get_adapter(model)
    check_skip_modules(model, config, adapter)
    model.eval()
    start = time.perf_counter()
    layer_bits = plan_bits(model, samples, config, adapter, progress) if config.avg_bits is not None else None
    resume = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(model, samples, config, batch_size, two_chain, type(adapter).__name__, run_info)
        resume = ResumeState(checkpoint_dir, fingerprint)
    if offload_dir is None and resume is not None:
        offload_dir = resume.offload_dir
    cache = ActivationCache(budget, offload_dir)
    timer = StageTimer()
    try:
        with timing(timer), retain_freed_memory():
            report = run_pipeline(model, samples, config, batch_size, adapter, progress, two_chain, resume, cache,
                                  timer, memo_bytes, observer, share_encoder_statistics, layer_bits)
    finally:
        cache.close()
        if resume is not None:
            resume.close()
    if resume is not None and not keep_checkpoint:
        resume.clear()
    from fade_kernels.nn.head import apply_head_format
    from fade_kernels.pipeline.head_calibration import head_solver

    # The tied output projection / token embedding, solved on the quantized model's statistics.
    apply_head_format(model, config.head, config.head_group_size,
                      head_solver(model, samples, config, adapter, batch_size, progress))
    report.average_bits = average_bits(model)
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    report.stage_seconds = {name: round(value, 6) for name, value in timer.seconds.items()}
    report.offloaded_mb = cache.spilled_bytes / 1e6
    return report
