"""The block-by-block pipeline on tiny random Whisper and Moonshine models."""
import copy

import pytest
import torch

from fade_kernels import QuantConfig, QuantLinear, quantize_model
from fade_kernels.calib.statistics import GramAccumulator, valid_rows
from fade_kernels.calib.samples import CalibSample
from fade_kernels.models.adapters import get_adapter


def whisper_samples(n=6, max_seconds=4):
    # Real Whisper padding is log-mel silence, modelled here by a constant after the audio.
    samples = []
    for i in range(n):
        seconds = 1 + i % max_seconds
        features = torch.full((80, 3000), -0.8)
        features[:, : seconds * 100] = torch.randn(80, seconds * 100)
        samples.append(CalibSample(features, seconds * 16000, torch.randint(3, 128, (4 + i,))))
    return samples


def moonshine_samples(n=6):
    return [CalibSample(torch.randn(6000 + 1000 * i), 6000 + 1000 * i, torch.randint(3, 128, (4 + i,)))
            for i in range(n)]


def relative_logits_error(model, reference, adapter, samples) -> float:
    """||logits - reference logits|| / ||reference logits|| on the first two samples, teacher-forced
    on their first 4 decoder tokens."""
    batch = samples[:2]
    inputs = adapter.collate_encoder_inputs(batch)
    ids = torch.stack([s.decoder_ids[:4] for s in batch])
    with torch.no_grad():
        expected = reference(**inputs, decoder_input_ids=ids).logits
        got = model(**inputs, decoder_input_ids=ids).logits
    return float((got - expected).norm() / expected.norm())


def test_statistics_drop_masked_rows():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rows = valid_rows(x, mask)
    assert torch.equal(rows, torch.cat([x[0, :2], x[1, :4]]))
    acc = GramAccumulator(8)
    acc.add(rows, None, None, total_rows=mask.numel())
    stats = acc.stats()
    assert stats.rows == 6 and acc.valid_fraction == 0.6
    expected = rows.double().t() @ rows.double() / 6
    torch.testing.assert_close(stats.hessian.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["whisper", "moonshine"])
@pytest.mark.parametrize("bits,threshold", [(4, 0.2), (3, 0.4)])
def test_every_target_is_quantized_and_logits_stay_close(family, bits, threshold, tiny_whisper, tiny_moonshine):
    model = tiny_whisper if family == "whisper" else tiny_moonshine
    samples = whisper_samples() if family == "whisper" else moonshine_samples()
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    targets = adapter.quantizable_names(model)
    report = quantize_model(model, samples, QuantConfig(method="gptq", bits=bits, group_size=32), batch_size=4,
                            progress=False)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], QuantLinear) for name in targets)
    assert len(report.layers) == len(targets) == (2 * 6 + 2 * 10)   # q,k,v,o,fc1,fc2 / + cross q,k,v,o
    # The output projection, embeddings and conv stem stay in full precision.
    assert not isinstance(model.proj_out, QuantLinear)
    assert model.config.quantization_config["bits"] == bits

    # Tiny random models are harsh (Gaussian weights, no outliers to exploit): ~10% weight
    # noise per layer at 4 bits. The bound catches a broken pipeline (errors of order 1).
    error = relative_logits_error(model, reference, adapter, samples)
    print(f"{family} {bits}-bit relative logits error {error:.3f}")
    assert error < threshold
    inputs = adapter.collate_encoder_inputs(samples[:2])
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2


@pytest.mark.slow
def test_gptq_layer_errors_below_rtn(tiny_whisper):
    samples = whisper_samples()
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(tiny_whisper)
        report = quantize_model(model, samples, QuantConfig(method=method, bits=3, group_size=32), progress=False)
        errors[method] = sum(layer.rel_output_error for layer in report.layers) / len(report.layers)
    assert errors["gptq"] < 0.8 * errors["rtn"]


@pytest.mark.slow
def test_padded_frames_and_tokens_are_excluded(tiny_whisper):
    samples = whisper_samples(n=2, max_seconds=2)   # 1 s and 2 s of 30 s windows
    report = quantize_model(tiny_whisper, samples, QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    by_name = {layer.name: layer for layer in report.layers}
    encoder_q = by_name["model.encoder.layers.0.self_attn.q_proj"]
    assert encoder_q.valid_row_fraction == pytest.approx((51 + 101) / 3000)
    cross_k = by_name["model.decoder.layers.0.encoder_attn.k_proj"]
    assert cross_k.valid_row_fraction == pytest.approx((51 + 101) / 3000)
    decoder_q = by_name["model.decoder.layers.0.self_attn.q_proj"]
    assert decoder_q.valid_row_fraction == pytest.approx((4 + 5) / 10)


def test_empty_calibration_is_a_clear_error(tiny_whisper):
    with pytest.raises(ValueError, match="samples is empty"):
        quantize_model(tiny_whisper, [], QuantConfig())
