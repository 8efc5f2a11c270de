"""fade_kernels.sweep end to end on a tiny random Whisper and a synthetic manifest (seconds)."""
import json
import statistics
import sys
import struct
import zlib

import numpy as np
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fade_kernels import sweep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class FakeTokenizer:
    """Word -> id in [4, 128) by CRC32; ids decode to 'w<id>'. Ids < 4 are special."""

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [4 + zlib.crc32(word.encode()) % 124 for word in text.split()]
        return Out()

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{int(t)}" for t in row if not (skip_special_tokens and int(t) < 4)) for row in ids]


# A 2 s input window instead of Whisper's 30 s: 200 mel frames -> 100 encoder frames, so the
# encoder runs 15x less work (the model's max_source_positions must match).
WINDOW_SECONDS = 2


class FakeProcessor:
    def __init__(self):
        from transformers import WhisperFeatureExtractor

        self.feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
        self.tokenizer = FakeTokenizer()

    def batch_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.batch_decode(ids, skip_special_tokens)


def write_manifest(folder, name, texts, subsets):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (text, subset) in enumerate(zip(texts, subsets)):
        audio = folder / f"{name}{k}.wav"
        rng = np.random.default_rng(zlib.crc32(f"{name}{k}".encode()))
        sf.write(str(audio), (0.1 * rng.standard_normal(8000 + 2000 * k)).astype(np.float32), 16000)
        lines.append(json.dumps({"audio": audio.name, "text": text, "id": f"{name}{k}", "subset": subset}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=50 * WINDOW_SECONDS, max_target_positions=64,
                           decoder_start_token_id=1, eos_token_id=2, pad_token_id=2, bos_token_id=2)
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture
def manifests(tmp_path):
    calib = write_manifest(tmp_path / "data", "calib", ["one two three", "four five", "six seven eight nine",
                                                         "ten eleven"], ["a", "a", "b", "b"])
    evaluation = write_manifest(tmp_path / "data", "eval", ["red green blue", "cyan magenta", "black white"],
                                ["piper", "noisy", "noisy"])
    return calib, evaluation


def run(tiny_whisper, manifests, out, seeds=(0, 1), **overrides):
    calib, evaluation = manifests
    kwargs = dict(methods=["rtn", "gptq"], bits_list=[4], group_size=32, seeds=list(seeds), calib_manifest=calib,
                  eval_manifest=evaluation, out_dir=out, n_calib=2, batch_size=2, eval_batch_size=4,
                  max_new_tokens=4, progress=False, model_and_processor=(tiny_whisper, FakeProcessor()))
    kwargs.update(overrides)
    return sweep.run_sweep("tiny-random", **kwargs)


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and min(struct.unpack(">II", data[16:24])) > 100


def quantized_bytes(k, n, bits, group, bias):
    # qweight (K*bits/32, N) int32, qzeros (G, N*bits/32) int32, scales (G, N) fp16, g_idx (K,) int32
    groups = k // group
    return k * bits // 32 * n * 4 + groups * (n * bits // 32) * 4 + groups * n * 2 + k * 4 + (4 * n if bias else 0)


def test_sweep_end_to_end_and_resume(tiny_whisper, manifests, tmp_path, monkeypatch):
    from fade_kernels import api
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.models.adapters import get_adapter

    fp_state = {k: v.clone() for k, v in tiny_whisper.state_dict().items()}
    out = tmp_path / "sweep"
    results = run(tiny_whisper, manifests, out)
    # The full-precision model is copied, never quantized in place.
    assert all(torch.equal(v, tiny_whisper.state_dict()[k]) for k, v in fp_state.items())

    stored = json.loads((out / "results.json").read_text())
    assert set(stored) >= {"settings", "meta", "calibration", "fp", "runs", "failed"}
    assert stored["failed"] == {}
    assert set(stored["runs"]) == {"rtn/w4/seedany", "gptq/w4/seed0", "gptq/w4/seed1"}
    calib_utts = load_corpus(manifests[0])
    for seed in (0, 1):
        assert stored["calibration"][str(seed)] == [u.id for u in select_subset(calib_utts, 2, seed)]

    n_targets = 2 * 6 + 2 * 10
    fp = stored["fp"]
    assert fp["n_utts"] == 3 and set(fp["subsets"]) == {"piper", "noisy"} and len(fp["hyps"]) == 3
    for key, record in stored["runs"].items():
        assert record["bits"] == 4 and record["group_size"] == 32
        assert record["seed"] == (None if key.startswith("rtn") else int(key[-1]))
        assert record["quant_seconds"] > 0 and record["peak_rss_mb"] > 0
        # The increase is measured from this process's RSS at entry, so it is part of the peak.
        increase = record["rss_increase_mb"]
        assert (increase is not None) == Path("/proc/self/clear_refs").exists()
        assert increase is None or increase <= record["peak_rss_mb"]
        assert len(record["report"]["layers"]) == n_targets
        assert set(record["subsets"]) == {"piper", "noisy"} and record["n_utts"] == 3
        # Weight memory: every target is a QuantLinear; bytes from the packed layout by hand.
        memory = record["weight_memory"]
        targets = get_adapter(tiny_whisper).quantizable_names(tiny_whisper)
        modules = dict(tiny_whisper.named_modules())
        expected = sum(quantized_bytes(modules[t].in_features, modules[t].out_features, 4, 32,
                                       modules[t].bias is not None) for t in targets)
        assert memory["n_quantized"] == n_targets
        assert memory["linears_bytes"] == memory["quantized_bytes"] == expected
        fp_linears = sum(modules[t].weight.numel() * 4 + (0 if modules[t].bias is None else modules[t].bias.numel() * 4)
                         for t in targets)
        assert fp["weight_memory"]["linears_bytes"] == fp_linears
        assert memory["model_bytes"] == fp["weight_memory"]["model_bytes"] - fp_linears + expected
        assert record["bytes_per_token"]["total"] < fp["bytes_per_token"]["total"]
        head_bytes = 128 * 64 * 4        # the fp32 output projection, read whole per token
        assert record["bytes_per_token"]["output_projection"] == head_bytes
        assert fp["bytes_per_token"]["output_projection"] == head_bytes

    # Table numbers agree with the per-seed runs.
    rows = {(r["method"], r["bits"]): r for r in sweep.summarize(stored)}
    gptq = rows[("gptq", 4)]
    wers = [stored["runs"][f"gptq/w4/seed{s}"]["wer"] for s in (0, 1)]
    assert gptq["n"] == 2 and gptq["wer_mean"] == pytest.approx(statistics.fmean(wers))
    assert gptq["wer_std"] == pytest.approx(statistics.stdev(wers))
    noisy = [stored["runs"][f"gptq/w4/seed{s}"]["subsets"]["noisy"]["wer"] for s in (0, 1)]
    assert gptq["subsets"]["noisy"]["mean"] == pytest.approx(statistics.fmean(noisy))
    assert rows[("rtn", 4)]["n"] == 1 and rows[("rtn", 4)]["wer_std"] is None
    table = (out / "results.md").read_text()
    assert f"| gptq | 4 | 2 | {100 * gptq['wer_mean']:.2f} ± {100 * gptq['wer_std']:.2f} |" in table
    assert "| fp32 | 32 | 1 |" in table and "noisy WER %" in table and "cross-attention k/v" in table
    for name in ("wer_per_method_seed.png", "error_vs_depth_w4.png"):
        assert is_png(out / "plots" / name)
        assert f"plots/{name}" in table

    # Resume: nothing left to quantize; one more seed quantizes only GPTQ for it (RTN is seed-free).
    calls = []
    real = api.quantize_model

    def counting(model, samples, config, *args, **kwargs):
        calls.append((config.method, config.bits))
        return real(model, samples, config, *args, **kwargs)

    monkeypatch.setattr(api, "quantize_model", counting)
    again = run(tiny_whisper, manifests, out)
    assert calls == [] and again["runs"].keys() == stored["runs"].keys()
    assert again["runs"]["gptq/w4/seed0"]["wer"] == stored["runs"]["gptq/w4/seed0"]["wer"]
    run(tiny_whisper, manifests, out, seeds=(0, 1, 2))
    assert calls == [("gptq", 4)]
    assert "| gptq | 4 | 3 |" in (out / "results.md").read_text()

    with pytest.raises(ValueError, match="different settings.*n_calib"):
        run(tiny_whisper, manifests, out, n_calib=3)


def test_sweep_rejects_bad_input(tiny_whisper, manifests, tmp_path):
    calib, evaluation = manifests
    with pytest.raises(ValueError, match="methods"):
        run(tiny_whisper, manifests, tmp_path / "a", methods=["gptq", "nope"])
    with pytest.raises(ValueError, match="seeds"):
        run(tiny_whisper, manifests, tmp_path / "b", seeds=())
    with pytest.raises(ValueError, match="calib_manifest is required"):
        run(tiny_whisper, manifests, tmp_path / "c", calib_manifest=None)
    with pytest.raises(ValueError, match="alpha"):
        run(tiny_whisper, manifests, tmp_path / "d", config_kwargs={"alpha": 2.0})
    with pytest.raises(ValueError, match="share 3 transcripts"):
        run(tiny_whisper, manifests, tmp_path / "e", calib_manifest=evaluation)


def test_bytes_per_token_counts_the_decoding_weights(tiny_whisper):
    decoder = tiny_whisper.model.decoder
    per_token = sweep.decode_bytes_per_token(tiny_whisper)
    layer_bytes = sum(p.numel() * 4 for name, p in decoder.named_parameters()
                      if "embed" not in name and "encoder_attn.k_proj" not in name
                      and "encoder_attn.v_proj" not in name)
    cross = sum(p.numel() * 4 for name, p in decoder.named_parameters()
                if "encoder_attn.k_proj" in name or "encoder_attn.v_proj" in name)
    assert per_token == {"decoder_layers": layer_bytes, "embedding_rows": 2 * 64 * 4,
                         "output_projection": 128 * 64 * 4, "total": layer_bytes + 2 * 64 * 4 + 128 * 64 * 4,
                         "cross_kv_bytes_per_utterance": cross}


def test_peak_memory_sees_an_allocation_inside_the_block():
    with sweep.PeakMemory() as memory:
        block = torch.ones(64 * 2**20 // 4)       # 64 MiB, touched
        del block
    if memory.increase_mb is None:
        assert not sys.platform.startswith("linux"), "Linux must give a per-block peak (clear_refs)"
        pytest.skip(f"no per-block peak on this platform ({memory.method})")
    assert memory.increase_mb > 50 and memory.peak_mb >= memory.start_mb + 50
    with sweep.PeakMemory() as quiet:
        pass
    assert quiet.increase_mb < 50      # the previous block's peak was reset, not carried over


def test_sweep_with_propagating_methods_plots_alpha_and_rho(tiny_whisper, manifests, tmp_path):
    out = tmp_path / "prop"
    results = run(tiny_whisper, manifests, out, seeds=(3,), methods=["qep", "fade"])
    assert results["failed"] == {} and set(results["runs"]) == {"qep/w4/seed3", "fade/w4/seed3"}
    for record in results["runs"].values():
        layers = record["report"]["layers"]
        assert all(layer["alpha"] is not None and layer["rel_error_fp"] is not None for layer in layers)
    assert all(layer["rho"] is not None for layer in results["runs"]["fade/w4/seed3"]["report"]["layers"])
    for name in ("alpha_per_layer_w4.png", "rho_per_layer_w4.png", "error_vs_depth_w4.png"):
        assert is_png(out / "plots" / name)
