"""The decode speed-ups change nothing: MaskedSuppress equals transformers' suppression
processors, transcribe restores the model's generation config and matches plain generate(),
and dequantized_linears computes what the QuantLinear layers compute."""
import copy

import numpy as np
import pytest
import torch

from fade_kernels.eval.decode import MaskedSuppress, dequantized_linears, prepare_inputs, transcribe


def test_masked_suppress_equals_the_stock_processors():
    from transformers.generation.logits_process import (SuppressTokensAtBeginLogitsProcessor,
                                                        SuppressTokensLogitsProcessor)

    generator = torch.Generator().manual_seed(0)
    suppress, begin = [1, 7, 50, 99], [3, 7, 98]
    ours = MaskedSuppress(suppress, begin)
    ours.set_begin_index(2)
    stock = [SuppressTokensLogitsProcessor(suppress), SuppressTokensAtBeginLogitsProcessor(begin, begin_index=2)]
    for length in (2, 3, 2, 5):           # at the begin index and after it, masks reused
        ids = torch.zeros(3, length, dtype=torch.long)
        scores = torch.randn(3, 100, generator=generator)
        expected = scores.clone()
        for processor in stock:
            expected = processor(ids, expected)
        assert torch.equal(ours(ids, scores.clone()), expected)


class Processor:
    def __init__(self):
        from transformers import WhisperFeatureExtractor

        self.feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=2)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row) for row in ids]


@pytest.fixture
def small_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=96, num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=100, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [0, 2, 5, 9, 40]
    model.generation_config.begin_suppress_tokens = [11, 12]
    model.generation_config.max_length = 30
    return model


def test_transcribe_matches_plain_generate_and_restores_the_config(small_whisper, one_thread):
    rng = np.random.default_rng(0)
    audios = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 9000, 20000)]
    before = copy.deepcopy(small_whisper.generation_config.to_dict())
    hyps = transcribe(small_whisper, Processor(), audios, batch_size=2, max_new_tokens=6, progress=False)
    assert small_whisper.generation_config.to_dict() == before
    expected = []
    with torch.inference_mode():
        for audio in audios:
            out = small_whisper.generate(**prepare_inputs(Processor(), [audio], small_whisper), max_new_tokens=6)
            expected.append(" ".join(str(int(t)) for t in out[0]))
    assert hyps == expected
    assert not any(f" {t} " in f" {h} " for h in hyps for t in (5, 9, 40))   # suppressed ids never appear


def test_dequantized_linears_compute_what_quantlinear_computes(small_whisper, one_thread):
    from fade_kernels.models.adapters import get_adapter
    from fade_kernels.nn.quant_linear import QuantLinear, replace_linears

    model = small_whisper
    names = get_adapter(model).quantizable_names(model)
    replace_linears(model, names, lambda name, linear: QuantLinear.from_linear(linear, bits=4, group_size=32,
                                                                                backend="torch"))
    features = torch.randn(2, 80, 200, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 7, 8, 9], [1, 3, 4, 6]])
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=ids).logits.double()
        with dequantized_linears(model) as count:
            assert count == len(names)
            assert not any(isinstance(m, QuantLinear) for m in model.modules())
            got = model(input_features=features, decoder_input_ids=ids).logits.double()
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(names)   # restored
    # Same weights, different summation order: float32 rounding only.
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
