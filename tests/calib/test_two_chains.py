"""The two-chain pipeline (QEP, FADE, AWQ) on tiny random Whisper and Moonshine models."""
import copy

import pytest
import torch

from fade_kernels import QuantConfig, quantize_model
from fade_kernels.api import PipelineObserver
from fade_kernels.models.adapters import get_adapter

from test_pipeline import moonshine_samples, relative_logits_error, whisper_samples

pytestmark = [pytest.mark.slow]


def test_chains_agree_exactly_before_the_first_quantized_layer(tiny_whisper):
    class Recording(PipelineObserver):
        def __init__(self):
            self.accumulators = []

        def statistics_collected(self, block_name, group_names, accumulator):
            self.accumulators.append(accumulator)

    observer = Recording()
    quantize_model(tiny_whisper, whisper_samples(), QuantConfig(method="qep", bits=3, group_size=32),
                   batch_size=4, progress=False, observer=observer)
    accumulators = observer.accumulators
    first = accumulators[0].stats()   # encoder block 0, q/k/v: nothing quantized upstream yet
    assert torch.count_nonzero(first.cross) == 0 and torch.count_nonzero(first.error) == 0
    # From the second group on, the quantized q/k/v make the chains differ.
    assert float(accumulators[1].stats().error.abs().max()) > 0


def test_qep_with_alpha_zero_is_plain_gptq_bit_for_bit(tiny_whisper):
    samples = whisper_samples()
    states = []
    for config in (QuantConfig(method="gptq", bits=3, group_size=32), QuantConfig(method="qep", alpha=0.0, bits=3, group_size=32)):
        model = copy.deepcopy(tiny_whisper)
        quantize_model(model, samples, config, batch_size=4, progress=False)
        states.append({k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales"))})
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("family,method", [("whisper", "qep"), ("whisper", "fade"), ("whisper", "awq"),
                                           ("whisper", "qep-awq"), ("moonshine", "fade"), ("moonshine", "awq-gptq")])
def test_methods_run_end_to_end_and_report_diagnostics(family, method, tiny_whisper, tiny_moonshine):
    model = tiny_whisper if family == "whisper" else tiny_moonshine
    samples = whisper_samples() if family == "whisper" else moonshine_samples()
    reference = copy.deepcopy(model)
    norms_before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    report = quantize_model(model, samples, QuantConfig(method=method, bits=4, group_size=32), batch_size=4,
                            progress=False, track_fp_error=True)
    adapter = get_adapter(model)
    assert [layer.name for layer in report.layers] == adapter.quantizable_names(model)
    for layer in report.layers:
        assert layer.stack in ("encoder", "decoder") and layer.block >= 0
        assert 0.0 <= layer.rel_error_fp < 1.0 and 0.0 <= layer.propagated_error < 1.0
        if method.startswith(("qep", "fade")):
            assert 0.0 <= layer.alpha <= 1.0
        if method == "fade":
            assert 0.0 <= layer.rho <= 1.0 and layer.vulnerability > 0 and layer.rel_error_fp_uncorrected is not None
    # AWQ folds its input scales into the LayerNorms in front of q/k/v, cross q and fc1 (a group
    # whose search keeps beta = 0 leaves its norm alone, so only "some norm changed" is certain
    # enough to assert); the other methods never touch a LayerNorm.
    modules = dict(model.named_modules())
    changed = [name for name, before in norms_before.items() if not torch.equal(modules[name].weight.detach(), before)]
    assert bool(changed) == ("awq" in method), changed
    if method.startswith("qep"):
        mlp_out = [layer.alpha for layer in report.layers if layer.name.endswith("fc2")]
        assert mlp_out and all(alpha == 0.0 for alpha in mlp_out)
    assert relative_logits_error(model, reference, adapter, samples) < 0.2


def test_fade_needs_two_utterances(tiny_whisper):
    with pytest.raises(ValueError, match="at least 2 calibration utterances"):
        quantize_model(tiny_whisper, whisper_samples(1), QuantConfig(method="fade"), progress=False)


@pytest.mark.parametrize("family,method", [("whisper", "gptq"), ("whisper", "fade"), ("moonshine", "qep")])
def test_cross_attention_kv_statistics_are_computed_once_and_change_nothing(family, method, tiny_whisper,
                                                                          tiny_moonshine):
    """Every decoder block's cross k/v read the same encoder output: the first decoder block's
    statistics serve all of them, and the codes equal a run that recomputes them per block."""
    model = tiny_whisper if family == "whisper" else tiny_moonshine
    samples = whisper_samples() if family == "whisper" else moonshine_samples()
    config = QuantConfig(method=method, bits=3, group_size=32)
    collected = []

    class Recording(PipelineObserver):
        def statistics_collected(self, block_name, group_names, accumulator):
            collected.append(group_names)

    states = []
    for share in (True, False):
        collected.clear()
        quantized = copy.deepcopy(model)
        quantize_model(quantized, samples, config, batch_size=4, progress=False, observer=Recording(),
                       share_encoder_statistics=share)
        n_decoder = len(get_adapter(quantized).decoder_layers(quantized))
        cross_kv = [names for names in collected if names == ("encoder_attn.k_proj", "encoder_attn.v_proj")]
        assert n_decoder > 1 and len(cross_kv) == (1 if share else n_decoder)
        states.append({k: v for k, v in quantized.state_dict().items() if k.endswith(("qweight", "qzeros", "scales"))})
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
