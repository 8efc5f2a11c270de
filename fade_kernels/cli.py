"""The `fade` command line: quantize | sweep | eval | transcribe | export | convert-ct2 | info.

Every bad argument ends in a one-line error naming it (exit code 2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fade_kernels.config import (AVG_BITS_RULES, CLIP_METHODS, DEFAULT_HEAD_GROUP_SIZE, EXPORT_FORMATS, FADE_RULES,
                                 HEAD_FORMATS, HEAD_SOLVERS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_METHODS)

# Methods whose result does not depend on calibration data (everything else needs --calib).
DATA_FREE_METHODS = ("rtn",)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def load_cli_model(spec: str):
    """A quantized checkpoint (config.json has quantization_config) or a full-precision model
    (local dir, hub id, or bundled:NAME) -> (model, processor)."""
    from fade_kernels.io.integrity import check_not_stripped_quantized
    from fade_kernels.models.bundled import load_model_and_processor, resolve_model
    from fade_kernels.models.source import check_model_spec

    check_model_spec(spec, "--model")
    path = Path(resolve_model(spec))
    config_file = path / "config.json"
    if config_file.is_file() and "quantization_config" in json.loads(config_file.read_text()):
        from fade_kernels.io.checkpoint import load_processor, load_quantized

        return load_quantized(path), load_processor(path)
    check_not_stripped_quantized(path)
    return load_model_and_processor(spec)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_quantize(args) -> int:
    import torch

    from fade_kernels.api import check_skip_modules, quantize_model
    from fade_kernels.memory.cache import parse_size
    from fade_kernels.pipeline.resume_state import (ResumeCorruptError, ResumeFolderBusyError, ResumeFolderError,
                                                    ResumeMismatchError, remove_resume_folder)
    from fade_kernels.cli_checks import check_calibration_size, check_quantize_outputs
    from fade_kernels.calib.samples import prepare_samples
    from fade_kernels.config import QuantConfig
    from fade_kernels.data.corpus import load_corpus, select_subset
    from fade_kernels.io.checkpoint import save_quantized
    from fade_kernels.memory.cache import parse_size

    if args.n_calib < 1:
        raise CliError(f"--n-calib must be at least 1, got {args.n_calib}")
    augmentations = _augmentations(args)
    try:
        parse_size(args.max_memory)
    except ValueError:
        raise CliError(f"--max-memory must be a size such as 4GB, 512MiB or a byte count, got {args.max_memory!r}") \
            from None
    if args.no_resume and (args.resume_dir or args.keep_resume_state):
        raise CliError("--no-resume cannot be combined with --resume-dir or --keep-resume-state")
    if args.method not in DATA_FREE_METHODS and not args.calib:
        raise CliError(f"--calib is required for --method {args.method} (a manifest .jsonl or a LibriSpeech-style folder)")
    try:
        config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, **_config_kwargs(args))
    except ValueError as error:
        raise CliError(_option_error(str(error))) from None
    out = Path(args.out)
    resume_dir = None if args.no_resume else Path(args.resume_dir or f"{out}.partial")
    check_quantize_outputs(out, args.overwrite, resume_dir, args.report, args.offload_dir)
    corpus = load_corpus(args.calib) if args.calib else []
    check_calibration_size(corpus, args.calib, args.n_calib)
    torch.manual_seed(args.seed)
    model, processor = load_cli_model(args.model)
    try:
        check_skip_modules(model, config)
    except ValueError as error:
        raise CliError(_option_error(str(error))) from None
    full_precision_bytes = sum(p.numel() * 4 for p in model.parameters())
    if args.calib:
        utterances = select_subset(corpus, args.n_calib, args.seed)
    else:
        # RTN needs no data; a few seconds of silence still exercise the pipeline's report.
        utterances = []
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{len(utterances)} calibration utterances (seed {args.seed})"
          + (f", each with {len(augmentations)} augmented copies ({', '.join(augmentations)})" if augmentations else ""))
    if utterances:
        samples = prepare_samples(model, processor, utterances, progress=not args.quiet,
                                  augmentations=augmentations, seed=args.seed)
    else:
        from fade_kernels.sweep import silence_samples

        samples = silence_samples(model, processor)
        config = config.without_calibration_data()
    if resume_dir is not None:
        args.interrupt_hint = args.storage_hint = (f"the finished blocks are kept in {resume_dir}: rerun the same "
                                                   f"command to continue from there")
    if resume_dir is not None and (resume_dir / "state.json").is_file():
        print(f"resuming from {resume_dir}: finished blocks are restored, the rest is quantized "
              f"(a run with other settings or data is refused)")
    run_info = {"calib": args.calib, "seed": args.seed, "model": args.model}
    try:
        report = quantize_model(model, samples, config, batch_size=args.batch_size, progress=not args.quiet,
                                checkpoint_dir=resume_dir, keep_checkpoint=True, max_memory=args.max_memory,
                                offload_dir=args.offload_dir, run_info=run_info)
    except (ResumeFolderBusyError, ResumeMismatchError, ResumeCorruptError, ResumeFolderError) as error:
        raise CliError(f"--resume-dir: {error} (or pass --no-resume)") from None
    save_quantized(model, out, processor=processor)   # replaces only what check_quantize_outputs allowed
    report_file = out / "quantization_report.json"
    report_file.write_text(json.dumps({**report.to_dict(), **run_info}, indent=1))
    _print_summary(report, out, full_precision_bytes)
    if args.report:
        _write_report_dir(report, Path(args.report), run_info)
    if resume_dir is not None and not args.keep_resume_state:
        # Only now: a kill before the checkpoint was saved resumes with every block restored.
        remove_resume_folder(resume_dir)
    return 0


def _write_report_dir(report, folder: Path, run_info: dict) -> None:
    """report.json and the per-layer plots of one quantization run."""
    from fade_kernels.report.plots import write_report_plots

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({**report.to_dict(), **run_info}, indent=1))
    paths = write_report_plots(report, folder)
    print(f"report: {folder / 'report.json'} and {', '.join(p.name for p in paths)}")


def _config_kwargs(args) -> dict:
    """QuantConfig fields the user set (options left at None keep QuantConfig's defaults)."""
    kwargs = {"sym": args.sym, "act_order": args.act_order, "damp": args.damp}
    for name in ("alpha", "qep_damp", "fade_rule", "awq_grid", "head", "head_group_size", "head_solver", "clip",
                 "avg_bits", "avg_bits_rule"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.qep_exclude is not None:
        kwargs["qep_exclude"] = tuple(item.strip() for item in args.qep_exclude.split(",") if item.strip())
    if getattr(args, "skip_modules", None):
        kwargs["skip_modules"] = tuple(item.strip() for item in args.skip_modules.split(",") if item.strip())
    return kwargs


def _option_error(message: str) -> str:
    """QuantConfig names fields (alpha must be ...); say which command-line option that is."""
    field = message.split(" ", 1)[0]
    option = "--" + field.replace("_", "-")
    return f"{option}: {message}" if field.isidentifier() and not message.startswith("--") else message


def _parse_list(value: str, option: str, cast=str, allowed=None) -> list:
    """A comma-separated option value -> list, each item cast and checked against `allowed`."""
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    if not items:
        raise CliError(f"{option} must list at least one value (comma-separated), got {value!r}")
    out = []
    for item in items:
        try:
            parsed = cast(item)
        except ValueError:
            raise CliError(f"{option}: {item!r} is not a valid {cast.__name__}") from None
        if allowed is not None and parsed not in allowed:
            raise CliError(f"{option}: unknown value {item!r}; choose from {', '.join(map(str, allowed))}")
        out.append(parsed)
    if len(set(out)) != len(out):
        raise CliError(f"{option} lists a value twice: {value!r}")
    return out


def _augmentations(args) -> tuple[str, ...]:
    """--augment as a tuple of calib.augment.AUGMENTATIONS names (CliError naming the option)."""
    from fade_kernels.calib.augment import parse_augmentations

    try:
        return parse_augmentations(args.augment)
    except ValueError as error:
        raise CliError(f"--augment: {error}") from None


def cmd_sweep(args) -> int:
    from fade_kernels.sweep import run_sweep

    methods = _parse_list(args.methods, "--methods", str, SUPPORTED_METHODS)
    bits = _parse_list(args.bits, "--bits", int, SUPPORTED_BITS)
    seeds = _parse_list(args.seeds, "--seeds", int)
    if args.n_calib < 1:
        raise CliError(f"--n-calib must be at least 1, got {args.n_calib}")
    augmentations = _augmentations(args)
    if args.max_eval is not None and args.max_eval < 1:
        raise CliError(f"--max-eval must be at least 1, got {args.max_eval}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    needs_calib = [m for m in methods if m not in DATA_FREE_METHODS]
    if needs_calib and not args.calib:
        raise CliError(f"--calib is required for --methods {','.join(needs_calib)} (a manifest .jsonl or a "
                       "LibriSpeech-style folder)")
    for option, path in (("--calib", args.calib), ("--eval", args.eval)):
        if path and not Path(path).exists():
            raise CliError(f"{option} manifest not found: {path}")
    kwargs = _config_kwargs(args)
    try:
        from fade_kernels.config import QuantConfig

        for method in methods:
            QuantConfig(method=method, bits=bits[0], group_size=args.group_size, **kwargs)
    except ValueError as error:
        raise CliError(_option_error(str(error))) from None
    results = run_sweep(args.model, methods, bits, args.group_size, seeds, args.calib, args.eval, args.out,
                        n_calib=args.n_calib, max_eval=args.max_eval, batch_size=args.batch_size,
                        eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                        dequantize_eval=not args.eval_kernels, config_kwargs=kwargs, progress=not args.quiet,
                        augmentations=augmentations)
    out = Path(args.out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots in {out / 'plots'}")
    failed = results.get("failed", {})
    if failed:
        print(f"fade sweep: {len(failed)} runs failed (rerun the same command to retry): {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


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
    if not utterances:
        raise CliError(f"--manifest {args.manifest} holds no utterances: nothing to evaluate")
    if not any(u.text is not None for u in utterances):
        raise CliError(f"--manifest {args.manifest}: no utterance has a reference text, so there is no WER to "
                       f"compute (use fade transcribe for unlabelled audio)")
    model, processor = load_cli_model(args.model)
    result = evaluate(model, processor, utterances, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_utts=args.max_utts, decoder=args.decoder,
                      language=args.language, temperature_fallback=args.temperature_fallback)
    print(f"WER {100 * result['wer']:.2f}% on {result['n_utts']} utterances "
          f"({result['audio_seconds'] / 60:.1f} min of audio), RTF {result['rtf']:.3f}")
    for subset, value in sorted(result.get("subsets", {}).items()):
        print(f"  {subset:12s} WER {100 * value['wer']:.2f}% ({value['n_scored']} utts)")
    if args.json:
        from fade_kernels.atomic import atomic_write_json

        atomic_write_json(Path(args.json), result, default=str)
    return 0


def cmd_transcribe(args) -> int:
    from fade_kernels.data.audio import load_audio
    from fade_kernels.eval.decode import transcribe

    missing = [path for path in args.audio if not Path(path).is_file()]
    if missing:
        raise CliError(f"AUDIO file not found: {missing[0]}")
    audios = [load_audio(path) for path in args.audio]
    model, processor = load_cli_model(args.model)
    start = time.perf_counter()
    texts = transcribe(model, processor, audios, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       progress=False, decoder=args.decoder, language=args.language,
                       temperature_fallback=args.temperature_fallback)
    seconds = time.perf_counter() - start
    for path, text in zip(args.audio, texts):
        print(f"{path}\t{text.strip()}")
    audio_seconds = sum(len(a) for a in audios) / 16000
    print(f"({len(audios)} files, {audio_seconds:.1f} s of audio in {seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    import warnings

    from fade_kernels.io.export import export_checkpoint

    if not Path(args.quantized_dir).is_dir():
        raise CliError(f"QUANTIZED_DIR not found: {args.quantized_dir}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_checkpoint(args.quantized_dir, args.out, args.format)
    for warning in caught:
        print(f"fade export: warning: {warning.message}", file=sys.stderr)
    print(f"exported {args.quantized_dir} -> {out} ({args.format})")
    return 0


def cmd_convert_ct2(args) -> int:
    from fade_kernels.io.output_dir import check_output_dir
    from fade_kernels.models.ct2_convert import convert_ct2_whisper

    kind = check_output_dir(args.out, args.overwrite, "OUT", "--overwrite")
    out = convert_ct2_whisper(args.src, args.out, overwrite=kind == "checkpoint")
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
    _add_method_options(q)
    q.add_argument("--calib", help="calibration manifest (.jsonl) or LibriSpeech-style folder")
    q.add_argument("--n-calib", type=int, default=64, help="calibration utterances drawn with --seed")
    q.add_argument("--seed", type=int, default=0)
    _add_augment_option(q)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--out", required=True,
                   help="output checkpoint directory: new or empty (a folder holding other files is refused)")
    q.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier checkpoint")
    q.add_argument("--report", metavar="DIR", help="also write report.json and per-layer PNG plots here")
    q.add_argument("--resume-dir", metavar="DIR",
                   help="resume folder (default OUT.partial): the state after every finished block is written "
                        "there; rerunning the same command after a crash or kill continues from the last finished "
                        "block with an identical result; deleted once OUT is saved")
    q.add_argument("--no-resume", action="store_true", help="write no resume state")
    q.add_argument("--keep-resume-state", action="store_true", help="keep the resume folder after success")
    q.add_argument("--max-memory", metavar="SIZE",
                   help="RAM budget of the activation caches (e.g. 4GB, 512MiB); beyond it they are written to "
                        "--offload-dir and memory-mapped, with identical results (default: no limit)")
    q.add_argument("--offload-dir", metavar="DIR",
                   help="where caches beyond --max-memory go (default: the resume folder, else the system temp "
                        "dir; avoid a tmpfs)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=cmd_quantize)

    w = commands.add_parser("sweep", help="methods x bits x calibration seeds: WER mean +- std, memory, plots")
    w.add_argument("--model", required=True, help="local dir, hub id, or bundled:tiny.en (full precision)")
    w.add_argument("--methods", default="rtn,gptq", help=f"comma list from {','.join(SUPPORTED_METHODS)}")
    w.add_argument("--bits", default="4,3", help=f"comma list from {','.join(map(str, SUPPORTED_BITS))}")
    w.add_argument("--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES)
    w.add_argument("--seeds", default="0,1,2,3,4", help="calibration seeds, comma list (one subset per seed)")
    w.add_argument("--calib", help="calibration manifest (.jsonl) or LibriSpeech-style folder")
    w.add_argument("--eval", required=True, help="evaluation manifest, sharing no sentence with --calib")
    w.add_argument("--out", required=True, help="output folder (results.json, results.md, plots/); reruns resume")
    w.add_argument("--n-calib", type=int, default=64, help="calibration utterances drawn per seed")
    _add_augment_option(w)
    w.add_argument("--max-eval", type=int, help="evaluate only the first N utterances")
    w.add_argument("--batch-size", type=int, default=8, help="calibration batch")
    w.add_argument("--eval-batch-size", type=int, default=16,
                   help="decoding batch (16 decoded tiny.en 1.5-1.9x faster than 8 here, same hypotheses)")
    w.add_argument("--max-new-tokens", type=int, default=128, help="bound so a looping hypothesis cannot hang")
    w.add_argument("--eval-kernels", action="store_true",
                   help="decode through the packed QuantLinear backends (default: dense linears on the "
                        "dequantized weights, the same model and much faster on CPU)")
    _add_method_options(w)
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(run=cmd_sweep)

    e = commands.add_parser("eval", help="WER of a model on a manifest or LibriSpeech folder")
    e.add_argument("--model", required=True)
    e.add_argument("--manifest", required=True, help="jsonl manifest or LibriSpeech-style folder")
    e.add_argument("--max-utts", type=int)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=128, help="bound so a looping hypothesis cannot hang")
    e.add_argument("--json", help="write the full result here")
    _add_decoding_options(e)
    e.set_defaults(run=cmd_eval)

    t = commands.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("audio", nargs="+", metavar="AUDIO")
    t.add_argument("--model", required=True)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-new-tokens", type=int, default=128)
    _add_decoding_options(t)
    t.set_defaults(run=cmd_transcribe)

    x = commands.add_parser("export", help="write a quantized checkpoint in a format other tools load (vLLM, "
                                           "transformers, llm-compressor's compressed-tensors; GPTQ)")
    x.add_argument("quantized_dir", metavar="QUANTIZED_DIR", help="a checkpoint written by fade quantize")
    x.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="compressed-tensors: pack-quantized W4A16/W8A16 (vLLM, transformers); "
                        "gptq: GPTQ v1 as vLLM loads it (symmetric 4/8-bit only)")
    x.add_argument("--out", required=True, help="new or empty folder (or an earlier export, which is replaced)")
    x.set_defaults(run=cmd_export)

    c = commands.add_parser("convert-ct2", help="CTranslate2 Whisper dir -> transformers checkpoint")
    c.add_argument("src", metavar="SRC")
    c.add_argument("out", metavar="OUT")
    c.add_argument("--overwrite", action="store_true", help="replace OUT when it holds an earlier conversion")
    c.set_defaults(run=cmd_convert_ct2)

    i = commands.add_parser("info", help="versions and kernel backends")
    i.set_defaults(run=cmd_info)
    return parser


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """Solver options shared by quantize and sweep (QuantConfig fields; unset keeps its default)."""
    parser.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag H")
    parser.add_argument("--alpha", type=float, help="QEP propagation strength in [0, 1] (qep* methods; default 0.5)")
    parser.add_argument("--qep-damp", type=float, help="QEP ridge as a fraction of mean diag H-hat (default 1.0)")
    parser.add_argument("--qep-exclude", metavar="ROLES",
                        help="comma list of layer roles/names kept at alpha 0 (default mlp_out; '' for none)")
    parser.add_argument("--fade-rule", choices=FADE_RULES, help="FADE alpha rule or ablation (default both)")
    parser.add_argument("--clip", choices=CLIP_METHODS,
                        help="grid range per group: minmax, or the shrunk range with the least rounding error, "
                             "unweighted (mse) or Hessian-weighted (hessian) (default: hessian for fade, minmax otherwise)")
    parser.add_argument("--awq-grid", type=int, help="number of AWQ exponents searched (default 20)")
    parser.add_argument("--skip-modules", metavar="PATTERNS",
                        help="comma list of glob patterns of linear layers kept in full precision, matched "
                             "against full names, e.g. 'model.decoder.layers.*.fc2,*.encoder_attn.v_proj'")
    parser.add_argument("--avg-bits", type=float,
                        help="mixed precision: mean stored bits per weight (scales and zero points included); the "
                             "linear groups most sensitive to rounding get the next wider grid (e.g. --bits 3 "
                             "--avg-bits 3.25: some groups at 4 bits)")
    parser.add_argument("--avg-bits-rule", choices=AVG_BITS_RULES,
                        help="which groups --avg-bits upgrades: sensitivity (default) or random (a control, "
                             "same budget, order drawn with --seed)")
    parser.add_argument("--head", choices=HEAD_FORMATS,
                        help="storage of the output projection and the token embedding tied to it: fp32, bf16, or "
                             "8/4 bits (codes from --head-solver; on CPU only bits4 has a packed kernel, a bits8 head is "
                             "dequantized at every decoder step) (default: QuantConfig's)")
    parser.add_argument("--head-group-size", type=int, choices=SUPPORTED_GROUP_SIZES,
                        help=f"columns per scale of a bits4/bits8 head (default {DEFAULT_HEAD_GROUP_SIZE})")
    parser.add_argument("--head-solver", choices=HEAD_SOLVERS,
                        help="how a bits4/bits8 head gets its codes: gptq (on the statistics of its input in the "
                             "quantized model; the default when there is calibration data) or rtn (round to nearest)")


def _add_augment_option(parser: argparse.ArgumentParser) -> None:
    """--augment, shared by quantize and sweep (calib/augment.py)."""
    parser.add_argument("--augment", metavar="KINDS",
                        help="comma list from speed,noise,level: one perturbed copy of every calibration clip per "
                             "name (tempo x0.9/1.1, white noise at 10-30 dB SNR, gain -12..+6 dB), drawn with the seed")


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Decoder choice shared by eval and transcribe (eval.decode.transcribe's arguments)."""
    from fade_kernels.eval.decode import DECODERS

    parser.add_argument("--decoder", choices=DECODERS, default="auto",
                        help="lean: our greedy loop with a static key/value cache (Whisper; same tokens as "
                             "generate(), faster); generate: transformers' generate(); auto: lean when it applies")
    parser.add_argument("--language", help="multilingual Whisper: language of the audio (e.g. en, de); default: "
                                           "the checkpoint's, else detected per utterance")
    parser.add_argument("--temperature-fallback", action="store_true",
                        help="decode again, sampling at temperatures 0.2..1.0, clips whose greedy transcript loops "
                             "(compression ratio > 2.4) or is unlikely (average log-prob < -1) (openai-whisper's "
                             "rule; lean decoder only)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from fade_kernels.user_errors import error_line, one_line_warnings

    try:
        with one_line_warnings(args.command):
            return args.run(args)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"fade {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as error:
        # Input errors are the user's to fix: one line, no traceback.
        message = str(error) if isinstance(error, CliError) else error_line(error, getattr(args, "storage_hint", ""))
        if message is None:
            raise
        print(f"fade {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
