"""An llm-compressor checkpoint runs on fade-kernels: packed import vs its dense decompression.

benchmarks/llmcompressor_baseline.py (in its own venv) quantizes Whisper with llm-compressor's
GPTQ W4A16 recipe, saves the compressed-tensors `pack-quantized` checkpoint
(OUT/w4a16-basic/), reloads it decompressed to dense weights and writes that model's greedy
transcripts (OUT/hyps-llmcompressor-gptq-w4a16-basic.json). This script, in the fade-kernels
venv:

1. loads the checkpoint with `load_quantized` (what `fade eval` / `fade transcribe` do): every
   layer becomes a packed QuantLinear (codes repacked, never densified; scales rounded to
   float16, since llm-compressor stores them in the model's float32);
2. loads it again as transformers does with compressed-tensors installed, decompressed to
   dense float32 weights (`CompressedTensorsConfig(run_compressed=False)`);
3. compares the weights (codes must match exactly: every dequantized weight equals the dense
   one up to the float16 rounding of its scale) and, against (code - zero) * scale computed in
   float64 from the checkpoint with compressed-tensors' own unpacking, which side rounds;
4. compares the greedy transcripts of the packed model, the library's dense decompression and
   a dense model holding the float64 weights (the decompression without rounding) on the
   manifest (same decoding code, batch 16, 128 new tokens), and, when --hyps is given, against
   the transcripts llm-compressor's own venv produced from its dense decompression.

  python benchmarks/llmcompressor_import_check.py --checkpoint OUT/w4a16-basic \
      --hyps OUT/hyps-llmcompressor-gptq-w4a16-basic.json --eval eval.jsonl --out result.json
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path


def exact_weights(checkpoint: Path, layers: dict) -> dict:
    """float64 (N, K) weights (code - zero) * scale of every packed layer, unpacked from the
    checkpoint's safetensors with compressed-tensors' own unpack_from_int32."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] in layers})
    out = {}
    for name, layer in layers.items():
        n, k = (int(v) for v in tensors[f"{name}.weight_shape"])
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], layer.bits, torch.Size((n, k))).double()
        scale = tensors[f"{name}.weight_scale"].double()
        packed_zero = tensors.get(f"{name}.weight_zero_point")      # absent for symmetric grids
        zero = torch.zeros_like(scale) if packed_zero is None else \
            unpack_from_int32(packed_zero, layer.bits, torch.Size(scale.shape), 0).double()
        group = k // scale.shape[1]
        out[name] = ((codes.view(n, -1, group) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).view(n, k)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="llm-compressor's pack-quantized checkpoint folder")
    p.add_argument("--eval", required=True, help="evaluation manifest (.jsonl)")
    p.add_argument("--hyps", help="transcripts of the dense decompression from llm-compressor's venv")
    p.add_argument("--max-utts", type=int)
    p.add_argument("--out", required=True, help="result json")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForSpeechSeq2Seq, CompressedTensorsConfig

    from fade_kernels.data.audio import load_audio
    from fade_kernels.data.corpus import load_corpus
    from fade_kernels.eval.decode import transcribe
    from fade_kernels.eval.wer import get_normalizer, wer_report
    from fade_kernels.io import load_processor, load_quantized, quantized_modules

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = load_quantized(args.checkpoint)
    notes = [str(w.message) for w in caught]
    dense = AutoModelForSpeechSeq2Seq.from_pretrained(
        args.checkpoint, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    processor = load_processor(args.checkpoint)

    layers = quantized_modules(packed)
    exact = exact_weights(Path(args.checkpoint), layers)
    worst_relative = 0.0
    worst_vs_exact = {"packed": 0.0, "dense": 0.0}
    for name, layer in layers.items():
        ours, theirs = layer.dequantize().double(), dense.get_submodule(name).weight.detach().double()
        if not torch.equal(ours == 0, theirs == 0):
            raise SystemExit(f"{name}: zero weights differ between the packed import and the decompression")
        relative = ((ours - theirs).abs() / theirs.abs())[theirs != 0]
        worst_relative = max(worst_relative, float(relative.max()))
        reference = exact[name]
        for key, weight in (("packed", ours), ("dense", theirs)):
            rel = ((weight - reference).abs() / reference.abs())[reference != 0]
            worst_vs_exact[key] = max(worst_vs_exact[key], float(rel.max()))
    specs = {(layer.bits, layer.group_size, layer.sym) for layer in layers.values()}
    # The decompression done without rounding: the dense model holding the float64 weights in
    # float32 (a model in bfloat16 rounds each dequantized weight to bfloat16 in the library).
    exact_dense = copy.deepcopy(dense)
    with torch.no_grad():
        for name, weight in exact.items():
            exact_dense.get_submodule(name).weight.copy_(weight.float())

    utterances = list(load_corpus(args.eval))[: args.max_utts]
    audios = [load_audio(u.audio) for u in utterances]
    hyps = {name: [h.strip() for h in transcribe(model, processor, audios, batch_size=16, max_new_tokens=128,
                                                 progress=False)]
            for name, model in (("packed", packed), ("dense", dense), ("dense, exact weights", exact_dense))}
    normalizer = get_normalizer(processor)
    result = {
        "checkpoint": str(args.checkpoint), "eval": str(args.eval), "n_utts": len(utterances),
        "quantized_layers": len(layers), "grids (bits, group, sym)": sorted(specs),
        "packed_layer_types": sorted({type(m).__name__ for m in layers.values()}),
        # Same codes => each weight differs only by its scale's float16 rounding (relative <= 2^-11);
        # one code step apart would be a relative difference of 1/15 or more.
        "max_relative_weight_difference": worst_relative, "same_codes": worst_relative <= 2 ** -11,
        # Against (code - zero) * scale in float64 from the checkpoint's own tensors (the library's
        # unpacking): which side rounds, and by how much (float16 scale: 2^-11; bfloat16: 2^-8).
        "max_relative_error_vs_float64": worst_vs_exact,
        "import_warnings": notes,
        "wer": {name: wer_report(utterances, h, normalizer=normalizer)["wer"] for name, h in hyps.items()},
        "identical_transcripts_packed_vs_dense": sum(a == b for a, b in zip(hyps["packed"], hyps["dense"])),
        "identical_transcripts_packed_vs_dense_exact": sum(
            a == b for a, b in zip(hyps["packed"], hyps["dense, exact weights"])),
        "differing": [{"id": u.id, "packed": a, "dense": b}
                      for u, a, b in zip(utterances, hyps["packed"], hyps["dense"]) if a != b],
    }
    if args.hyps:
        theirs = {row["id"]: row["hyp"].strip() for row in json.loads(Path(args.hyps).read_text())}
        common = [(u, h) for u, h in zip(utterances, hyps["packed"]) if u.id in theirs]
        result["identical_transcripts_packed_vs_llmcompressor_venv"] = sum(theirs[u.id] == h for u, h in common)
        result["compared_with_llmcompressor_venv"] = len(common)
        result["wer"]["dense, llm-compressor venv"] = wer_report(
            [u for u, _ in common], [theirs[u.id] for u, _ in common], normalizer=normalizer)["wer"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "differing"}, indent=1))


if __name__ == "__main__":
    main()
