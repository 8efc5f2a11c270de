"""What verifying checkpoint digests costs: a large-v3-sized 4-bit checkpoint, loaded with and without
the sha256 check, plus the digest of a resume activation file.

    python benchmarks/bench_integrity.py --out benchmarks/results/integrity

The checkpoint has whisper-large-v3's shapes (benchmarks/bench_quantize.py RANDOM_MODELS) with
random values: every block linear is a QuantLinear (4-bit, group 128) holding random codes, the
rest random float32. It is built directly in its packed form (no 6 GB float model, no solver), so
the script needs ~3 GB of RAM and ~1.1 GB of disk. Times are the median of --repeats runs of
load_quantized(verify=True) and load_quantized(verify=False), with the files in the page cache
("warm") and evicted from it with posix_fadvise(DONTNEED) before each load ("cold": read from
disk). Writes integrity.json and README-ready markdown (integrity.md) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_quantize import RANDOM_MODELS, machine  # noqa: E402

BITS, GROUP = 4, 128


def build_checkpoint(folder: Path) -> Path:
    """Save a large-v3-shaped 4-bit checkpoint of random values into folder/ckpt."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from fade_kernels.io import save_quantized
    from fade_kernels.nn import QuantLinear, replace_linears

    config = WhisperConfig(**RANDOM_MODELS["large-v3"], decoder_start_token_id=50258, eos_token_id=50257,
                           pad_token_id=50257, bos_token_id=50257)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]
    replace_linears(model, names, lambda name, linear: QuantLinear(
        linear.in_features, linear.out_features, BITS, GROUP, bias=linear.bias is not None))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(".g_idx"):
                tensor.copy_(torch.arange(tensor.numel(), dtype=torch.int32) // GROUP)
            elif tensor.dtype == torch.int32:
                tensor.copy_(torch.randint(-2**31, 2**31 - 1, tensor.shape, dtype=torch.int32, generator=generator))
            elif name.endswith(".scales"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator).half() * 0.01 + 1e-3)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    model.tie_weights()
    out = folder / "ckpt"
    start = time.perf_counter()
    save_quantized(model, out, quant_config={"method": "random"})
    print(f"saved {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (only these files; no root needed)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, repeats: int, before=None) -> list[float]:
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        del result
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/integrity")
    parser.add_argument("--workdir", help="where the checkpoint is written (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fade_kernels.pipeline.resume_state import _save_tensors
    from fade_kernels.io import load_quantized
    from fade_kernels.io.integrity import file_sha256, verify_checksums, write_checksums

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        ckpt = build_checkpoint(work)
        total = sum(p.stat().st_size for p in ckpt.iterdir())
        result = {"machine": machine(), "checkpoint_bytes": total, "repeats": args.repeats,
                  "files": {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}}
        result["write_checksums_s"] = statistics.median(timed(lambda: write_checksums(ckpt), args.repeats))
        for cache, before in (("warm", None), ("cold", lambda: evict(ckpt))):
            verify = timed(lambda: verify_checksums(ckpt), args.repeats, before)
            checked = timed(lambda: load_quantized(ckpt, verify=True), args.repeats, before)
            unchecked = timed(lambda: load_quantized(ckpt, verify=False), args.repeats, before)
            result[cache] = {"verify_s": statistics.median(verify), "load_verified_s": statistics.median(checked),
                             "load_unverified_s": statistics.median(unchecked),
                             "runs": {"verify": verify, "load_verified": checked, "load_unverified": unchecked}}
            result[cache]["overhead_ratio"] = result[cache]["load_verified_s"] / result[cache]["load_unverified_s"]
            result[cache]["sha256_gb_per_s"] = total / result[cache]["verify_s"] / 1e9
            print(cache, json.dumps({k: v for k, v in result[cache].items() if k != "runs"}), flush=True)
        del ckpt
        # One resume activation file: 64 utterances x 1500 frames x 1280 channels, float32.
        acts = {"q.0": torch.randn(64, 1500, 1280)}
        path = work / "encoder-acts000.safetensors"
        write = timed(lambda: _save_tensors(path, acts), args.repeats)
        digest = timed(lambda: file_sha256(path), args.repeats)
        result["resume_activation_file"] = {"bytes": path.stat().st_size, "write_s": statistics.median(write),
                                            "sha256_s": statistics.median(digest)}
        print("resume", json.dumps(result["resume_activation_file"]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "integrity.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = ["| page cache | sha256 of all files | load, verified | load, not verified | verified / not |",
            "|---|---|---|---|---|"]
    for cache in ("warm", "cold"):
        r = result[cache]
        rows.append(f"| {cache} | {r['verify_s']:.2f} s ({r['sha256_gb_per_s']:.2f} GB/s) | {r['load_verified_s']:.2f} s "
                    f"| {r['load_unverified_s']:.2f} s | {r['overhead_ratio']:.2f}x |")
    a = result["resume_activation_file"]
    rows.append("")
    rows.append(f"Checkpoint {total / 1e9:.2f} GB; writing fade_checksums.json (file + per-tensor digests) "
                f"{result['write_checksums_s']:.2f} s. Resume activation file {a['bytes'] / 1e9:.2f} GB: written "
                f"in {a['write_s']:.2f} s, its sha256 {a['sha256_s']:.2f} s.")
    (out / "integrity.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
