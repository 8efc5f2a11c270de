"""The model-level pass: the encoder stack, then the decoder stack on the quantized encoder's output."""
from __future__ import annotations

from torch import nn

from fade_kernels.pipeline.resume_state import ResumeMismatchError, ResumeState
from fade_kernels.calib.samples import CalibSample
from fade_kernels.config import QuantConfig
from fade_kernels.io.checkpoint import build_quantization_config
from fade_kernels.memory.cache import ActivationCache, load
from fade_kernels.models.adapters import OWN_TOKENS, ModelAdapter
from fade_kernels.pipeline.inputs import calibration_batches, cross_fitting_halves, decoder_first_call, encoder_first_call
from fade_kernels.pipeline.memo import MEMO_BUDGET_BYTES
from fade_kernels.pipeline.report import QuantizationReport
from fade_kernels.pipeline.resume import BlockCommitter, replace_hidden_states, restore_finished_blocks
from fade_kernels.pipeline.stack import PipelineObserver, StackQuantizer
from fade_kernels.timing import StageTimer, stage


def run_pipeline(model: nn.Module, samples: list[CalibSample], config: QuantConfig, batch_size: int,
                 adapter: ModelAdapter, progress: bool, two_chain: bool, resume: ResumeState | None,
                 cache: ActivationCache, timer: StageTimer, memo_budget: int | None = None,
                 observer: PipelineObserver | None = None, share_encoder_statistics: bool = True,
                 layer_bits: dict[str, int] | None = None) -> QuantizationReport:
    """Quantize the encoder's blocks, then the decoder's, in place; returns the run's report.

    two_chain: also run the full-precision chain. resume: the run's resume folder (finished
    blocks are restored, the rest quantized) or None. cache: where the activations live. timer:
    collects the stage seconds (the caller makes it current with timing.timing). memo_budget:
    bytes for replaying solved outputs (default MEMO_BUDGET_BYTES, at most a quarter of the
    cache's budget). observer, share_encoder_statistics: see StackQuantizer. layer_bits: {full
    name: bits} of a mixed-precision plan (pipeline/bit_allocation.py); others use config.bits.
    """
    report = QuantizationReport(config=config.to_dict(), n_calib=len(samples), layer_bits=dict(layer_bits or {}))
    enc_layers, dec_layers = adapter.encoder_layers(model), adapter.decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    batches = calibration_batches(samples, batch_size)
    halves = cross_fitting_halves(batches)
    put = cache.put

    # A resumed run: finished blocks come back from disk exactly as they were packed.
    saved = resume.load() if resume is not None else None
    stage_name, next_block = (saved.stage, saved.next_block) if saved else ("encoder", 0)
    quantized = {"encoder": [], "decoder": []}
    if saved:
        quantized = restore_finished_blocks(resume, saved, report, {"encoder": (names[enc_layers], enc_layers),
                                            "decoder": (names[dec_layers], dec_layers)}, config, layer_bits)
    committer = BlockCommitter(resume, report, quantized, saved.encoder_outputs if saved else None)
    if memo_budget is None:
        memo_budget = MEMO_BUDGET_BYTES
    if cache.max_bytes is not None:
        memo_budget = min(memo_budget, cache.max_bytes // 4)
    stack = StackQuantizer(config, report, progress, two_chain, cache, timer, committer, memo_budget, observer,
                           share_encoder_statistics, layer_bits)
    stack.quantized = [f"{names[layers]}.{index}.{name}" for stack_name, layers in (("encoder", enc_layers),
                       ("decoder", dec_layers)) for index, block in enumerate(quantized[stack_name]) for name in block]

    # Encoder: capture block-0 inputs; the mask keeps the frames that carry real audio. (A run
    # resumed past the encoder still needs the masks and the collated inputs.)
    enc_calls, enc_masks, enc_inputs = [], [], []
    for batch in batches:
        inputs, call, masks = encoder_first_call(model, adapter, batch)
        enc_inputs.append(inputs)
        enc_masks.append(masks)
        if stage_name == "encoder":
            call["hidden_states"] = put(call["hidden_states"])
            enc_calls.append(call)
    final_norm = adapter.encoder_final_norm(model)
    if stage_name == "encoder":
        # Both chains start from the same (full-precision) stem output, each with its own entry.
        enc_fp_calls = [{**call, "hidden_states": put(load(call["hidden_states"]))} for call in enc_calls] \
            if two_chain else None
        if next_block > 0:
            replace_hidden_states(resume, saved.activations, cache, enc_calls, enc_fp_calls)
        hidden, fp_hidden = stack.run("encoder", enc_layers, names[enc_layers], adapter.encoder_groups, enc_calls,
                                      enc_masks, halves, enc_fp_calls, start=next_block)
        with stage("forward"):
            encoder_outputs = [put(final_norm(load(entry))) for entry in hidden]
            fp_encoder_outputs = [put(final_norm(load(entry))) for entry in fp_hidden] if two_chain else None
        for entry in hidden + (fp_hidden or []):
            cache.release(entry)
        del enc_calls, enc_fp_calls, hidden, fp_hidden
        if resume is not None:
            with stage("checkpoint"):
                committer.encoder_outputs_file = resume.save_encoder_outputs(encoder_outputs, fp_encoder_outputs)
        next_block = 0
    else:
        with stage("checkpoint"):
            encoder_outputs, fp_encoder_outputs = resume.read_chains(committer.encoder_outputs_file, put)
        if two_chain and fp_encoder_outputs is None:
            raise ResumeMismatchError(f"{resume.dir}: the saved encoder outputs lack the full-precision chain")

    # Decoder: teacher-forced on the transcript tokens, cross-attention on the quantized encoder.
    dec_calls, dec_masks, dec_fp_calls = [], [], []
    for index, (batch, enc_out, enc_mask, inputs) in enumerate(zip(batches, encoder_outputs, enc_masks, enc_inputs)):
        call, masks = decoder_first_call(model, adapter, batch, inputs, load(enc_out), enc_mask[OWN_TOKENS])
        call["hidden_states"] = put(call["hidden_states"])
        call["encoder_hidden_states"] = enc_out
        dec_calls.append(call)
        dec_masks.append(masks)
        if two_chain:
            # Same tokens; cross-attention reads the full-precision encoder's output.
            dec_fp_calls.append({**call, "hidden_states": put(load(call["hidden_states"])),
                                 "encoder_hidden_states": fp_encoder_outputs[index]})
    if stage_name == "decoder" and next_block > 0:
        replace_hidden_states(resume, saved.activations, cache, dec_calls, dec_fp_calls if two_chain else None)
    hidden, fp_hidden = stack.run("decoder", dec_layers, names[dec_layers], adapter.decoder_groups, dec_calls,
                                  dec_masks, halves, dec_fp_calls if two_chain else None, start=next_block)
    for entry in hidden + (fp_hidden or []) + encoder_outputs + (fp_encoder_outputs or []):
        cache.release(entry)
    # What save_quantized will write, already on the model: method, desc_act, each layer's grid,
    # and the patterns of the layers kept in full precision.
    recorded = {"method": config.method, "desc_act": config.act_order}
    if config.skip_modules:
        recorded["skip_modules"] = list(config.skip_modules)
    model.config.quantization_config = build_quantization_config(model, recorded)
    return report
