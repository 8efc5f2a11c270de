"""The block-by-block quantization pipeline behind fade_kernels.api.quantize_model.

run: the model-level pass (encoder stack, then decoder stack). inputs: calibration batches,
first-block calls and row masks. stack: StackQuantizer, the block loop of one stack. memo:
replay of a block's solved outputs. resume: what a resumable run saves and restores;
resume_state: the resume folder on disk (fingerprint, per-block state, atomic writes). report:
the LayerReport / QuantizationReport records a run returns.
"""
