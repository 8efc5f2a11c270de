"""The `fade` command line: quantize | eval | transcribe | convert-ct2 | info.

Every bad argument ends in a one-line error naming it (exit code 2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fade_kernels.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_METHODS


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _load_model(spec: str):
    """A quantized checkpoint (config.json has quantization_config) or a full-precision model
    (local dir, hub id, or bundled:NAME) -> (model, processor)."""
    from fade_kernels.models.bundled import load_model_and_processor, resolve_model

    path = Path(resolve_model(spec))
    config_file = path / "config.json"
    if config_file.is_file() and "quantization_config" in json.loads(config_file.read_text()):
        from fade_kernels.io.checkpoint import load_processor, load_quantized

        return load_quantized(path), load_processor(path)
    return load_model_and_processor(spec)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_quantize(args) -> int:
    import torch

    from fade_kernels.api import quantize_model
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.config import QuantConfig
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.io.checkpoint import save_quantized

    if args.n_calib < 1:
        raise CliError(f"--n-calib must be at least 1, got {args.n_calib}")
    if args.method == "gptq" and not args.calib:
        raise CliError("--calib is required for --method gptq (a manifest .jsonl or a LibriSpeech-style folder)")
    try:
        config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                             act_order=args.act_order, damp=args.damp)
    except ValueError as error:
        raise CliError(str(error)) from None
    torch.manual_seed(args.seed)
    model, processor = _load_model(args.model)
    full_precision_bytes = sum(p.numel() * 4 for p in model.parameters())
    if args.calib:
        utterances = select_subset(load_corpus(args.calib), args.n_calib, args.seed)
    else:
        # RTN needs no data; a few seconds of silence still exercise the pipeline's report.
        utterances = []
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{len(utterances)} calibration utterances (seed {args.seed})")
    if utterances:
        samples = prepare_samples(model, processor, utterances, progress=not args.quiet)
    else:
        samples = _silence_samples(model, processor)
    report = quantize_model(model, samples, config, batch_size=args.batch_size, progress=not args.quiet)
    out = Path(args.out)
    save_quantized(model, out, processor=processor)
    report_file = out / "quantization_report.json"
    report_file.write_text(json.dumps({
        "config": report.config, "seconds": report.seconds, "peak_rss_mb": report.peak_rss_mb,
        "n_calib": report.n_calib, "calib": args.calib, "seed": args.seed, "model": args.model,
        "layers": [vars(layer) for layer in report.layers]}, indent=1))
    _print_summary(report, out, full_precision_bytes)
    return 0


def _silence_samples(model, processor):
    import numpy as np
    import torch

    from fade_kernels.calib.samples import CalibSample
    from fade_kernels.models.adapters import get_adapter

    adapter = get_adapter(model)
    audio = np.zeros(16000, dtype=np.float32)
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    prompt = adapter.decoder_prompt(model, processor.tokenizer) + [model.config.eos_token_id]
    return [CalibSample(features[adapter.encoder_input_name()][0].float(), len(audio), torch.tensor(prompt))]


def _print_summary(report, out: Path, full_precision_bytes: int) -> None:
    print(report.summary())
    worst = sorted(report.layers, key=lambda layer: layer.rel_output_error, reverse=True)[:8]
    print("largest relative output errors:")
    for layer in worst:
        print(f"  {layer.rel_output_error:.4f}  {layer.name}  {layer.shape[0]}x{layer.shape[1]}")
    size = _directory_size(out)
    print(f"checkpoint {out}: {size / 2**20:.1f} MiB on disk vs {full_precision_bytes / 2**20:.1f} MiB fp32 "
          f"weights ({full_precision_bytes / max(size, 1):.2f}x smaller; fp16 would be "
          f"{full_precision_bytes / 2 / 2**20:.1f} MiB)")


def cmd_eval(args) -> int:
    from fade_kernels.data.corpus import load_corpus
    from fade_kernels.eval.decode import evaluate

    if args.max_utts is not None and args.max_utts < 1:
        raise CliError(f"--max-utts must be at least 1, got {args.max_utts}")
    utterances = load_corpus(args.manifest)
    model, processor = _load_model(args.model)
    result = evaluate(model, processor, utterances, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_utts=args.max_utts)
    print(f"WER {100 * result['wer']:.2f}% on {result['n_utts']} utterances "
          f"({result['audio_seconds'] / 60:.1f} min of audio), RTF {result['rtf']:.3f}")
    for subset, value in sorted(result.get("subsets", {}).items()):
        print(f"  {subset:12s} WER {100 * value['wer']:.2f}% ({value['n_scored']} utts)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def cmd_transcribe(args) -> int:
    from fade_kernels.data.audio import load_audio
    from fade_kernels.eval.decode import transcribe

    missing = [path for path in args.audio if not Path(path).is_file()]
    if missing:
        raise CliError(f"AUDIO file not found: {missing[0]}")
    model, processor = _load_model(args.model)
    audios = [load_audio(path) for path in args.audio]
    start = time.perf_counter()
    texts = transcribe(model, processor, audios, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       progress=False)
    seconds = time.perf_counter() - start
    for path, text in zip(args.audio, texts):
        print(f"{path}\t{text.strip()}")
    audio_seconds = sum(len(a) for a in audios) / 16000
    print(f"({len(audios)} files, {audio_seconds:.1f} s of audio in {seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_convert_ct2(args) -> int:
    from fade_kernels.models.ct2_convert import convert_ct2_whisper

    out = convert_ct2_whisper(args.src, args.out)
    print(f"converted {args.src} -> {out}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import fade_kernels
    from fade_kernels.ops import backend_table

    print(f"fade-kernels {fade_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed")
    from fade_kernels.ops.registry import AUTO_ORDER, auto_order

    print("backends:")
    for row in backend_table():
        state = "available" if row["available"] else f"unavailable: {row['why_unavailable']}"
        print(f"  {row['name']:8s} devices={row['devices']:9s} bits={row['bits']:8s} {state}")
    for device in AUTO_ORDER:
        print(f"auto order for {device} tensors: {' -> '.join(b.name for b in auto_order(device))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fade", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model and save a packed checkpoint")
    q.add_argument("--model", required=True, help="local dir, hub id, or bundled:tiny.en")
    q.add_argument("--method", default="gptq", choices=SUPPORTED_METHODS)
    q.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    q.add_argument("--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES)
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag H")
    q.add_argument("--calib", help="calibration manifest (.jsonl) or LibriSpeech-style folder")
    q.add_argument("--n-calib", type=int, default=64, help="calibration utterances drawn with --seed")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=cmd_quantize)

    e = commands.add_parser("eval", help="WER of a model on a manifest or LibriSpeech folder")
    e.add_argument("--model", required=True)
    e.add_argument("--manifest", required=True, help="jsonl manifest or LibriSpeech-style folder")
    e.add_argument("--max-utts", type=int)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=128, help="bound so a looping hypothesis cannot hang")
    e.add_argument("--json", help="write the full result here")
    e.set_defaults(run=cmd_eval)

    t = commands.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("audio", nargs="+", metavar="AUDIO")
    t.add_argument("--model", required=True)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.set_defaults(run=cmd_transcribe)

    c = commands.add_parser("convert-ct2", help="CTranslate2 Whisper dir -> transformers checkpoint")
    c.add_argument("src", metavar="SRC")
    c.add_argument("out", metavar="OUT")
    c.set_defaults(run=cmd_convert_ct2)

    i = commands.add_parser("info", help="versions and kernel backends")
    i.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (CliError, FileNotFoundError, ValueError) as error:
        # Input errors are the user's to fix: one line, no traceback.
        print(f"fade {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
