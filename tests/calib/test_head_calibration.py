"""The GPTQ head: its input statistics against a hooked forward in float64, its logit error
against round to nearest's, and the whole path through quantize_model."""
from __future__ import annotations

import pytest
import torch

from fade_kernels.api import quantize_model
from fade_kernels.config import QuantConfig
from fade_kernels.models.adapters import get_adapter
from fade_kernels.nn import QuantLinear
from fade_kernels.nn.head import PackedEmbedding
from fade_kernels.pipeline.head_calibration import gptq_head, head_input_gram
from fade_kernels.solver.rtn import rtn_quantize
from fade_kernels.solver.grid import dequantize_grouped

from test_pipeline import whisper_samples


def _reference_gram(model, samples) -> torch.Tensor:
    """float64 mean of x x^T over real tokens, x captured at proj_out's input, one utterance per forward."""
    rows = []
    hook = model.proj_out.register_forward_pre_hook(lambda module, args: rows.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for sample in samples:
                model(input_features=sample.encoder_input[None], decoder_input_ids=sample.decoder_ids[None])
    finally:
        hook.remove()
    x = torch.cat(rows)
    return x.t() @ x / x.shape[0]


def test_head_gram_is_the_projection_input_over_real_tokens(tiny_whisper, one_thread):
    # Batches of 3 pad the shorter transcripts; the padded positions must not count. The
    # reference runs each utterance alone, so it has no padded tokens. Whisper attends to every
    # encoder frame (padding is silence), so the per-utterance forward sees the same frames.
    samples = whisper_samples(n=5)
    got = head_input_gram(tiny_whisper, samples, get_adapter(tiny_whisper), batch_size=3, progress=False)
    expected = _reference_gram(tiny_whisper, samples)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, got.t())
    # float32 sums of ~30 rows of unit-scale values: relative error well under 1e-5.
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_head_has_lower_logit_error_than_round_to_nearest(bits, one_thread):
    # Hidden states with a few large directions, as after a layer norm with outlier channels.
    vocab, width = 300, 64
    weight = torch.randn(vocab, width)
    mix = torch.randn(width, width) * torch.logspace(0, -2, width)
    hidden = torch.randn(2000, width) @ mix.t()
    hessian = hidden.t() @ hidden / hidden.shape[0]

    def logit_error(dequantized: torch.Tensor) -> float:
        delta = (weight - dequantized).double()
        return float(torch.trace(delta @ hessian.double() @ delta.t()))

    head = gptq_head(weight, hessian, bits, 32, QuantConfig(bits=bits))
    assert isinstance(head, QuantLinear) and head.bits == bits and head.bias is None
    codes, scales, zeros = rtn_quantize(weight, bits, 32)
    rtn = logit_error(dequantize_grouped(codes, scales, zeros))
    gptq = logit_error(head.dequantize())
    assert gptq < 0.5 * rtn, (gptq, rtn)   # about 0.2 on these inputs


def test_quantize_model_solves_the_head_with_gptq(tiny_whisper, one_thread):
    samples = whisper_samples(n=4)
    weight = tiny_whisper.proj_out.weight.detach().clone()
    config = QuantConfig(method="rtn", bits=4, group_size=32, head="bits4", head_solver="gptq")
    quantize_model(tiny_whisper, samples, config, batch_size=2, progress=False)
    head, embedding = tiny_whisper.proj_out, tiny_whisper.model.decoder.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(embedding, PackedEmbedding) and embedding.head is head
    codes, scales, zeros = rtn_quantize(weight, 4, 32)
    rtn = dequantize_grouped(codes, scales, zeros)
    # The statistics changed the codes: not round to nearest's matrix, yet close to the weight.
    assert not torch.equal(head.dequantize(), rtn)
    error = (head.dequantize() - weight).norm() / weight.norm()
    assert error < 0.2, error


def test_a_run_without_calibration_data_rounds_the_head(assets, tmp_path, fade):
    # RTN without --calib calibrates on silence: its head statistics would be of silence, so the
    # default GPTQ head gives way to round to nearest.
    from transformers import WhisperForConditionalGeneration

    from fade_kernels.io import load_quantized

    out = tmp_path / "q"
    code, _, err = fade("quantize", "--model", str(assets["model"]), "--method", "rtn", "--bits", "4",
                        "--group-size", "32", "--head", "bits4", "--out", str(out), "--quiet")
    assert code == 0, err
    weight = WhisperForConditionalGeneration.from_pretrained(assets["model"]).proj_out.weight.detach()
    codes, scales, zeros = rtn_quantize(weight, 4, 32)
    head = load_quantized(out).proj_out
    assert torch.equal(head.dequantize(), dequantize_grouped(codes, scales, zeros))
