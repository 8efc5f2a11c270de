"""The benchmark scripts run (--tiny presets, toy shapes) and write the JSON they promise.

Not timing tests: the numbers of a --tiny run mean nothing. Both scripts start together in
subprocesses (module fixture) so their import time overlaps; the target logic of
bench_qmatmul.summarize is checked on hand-made rows.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = [pytest.mark.skipif(not (BENCH / "bench_qmatmul.py").is_file(), reason="benchmarks/ not in this checkout"),
              pytest.mark.slow, pytest.mark.subprocess]


def _cpu_kernels_available() -> bool:
    from fade_kernels.ops import cpu

    return cpu.cpu_available()[0]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Start `bench_qmatmul.py --tiny` and `bench_e2e.py --tiny` at once; {name: (returncode, json, output)}."""
    if not _cpu_kernels_available():
        pytest.skip("the CPU kernels (fade_kernels._C) are not built")
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the scripts never run Triton on CPU tensors
    procs = {}
    for name in ("bench_qmatmul", "bench_e2e"):
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--tiny", "--json", str(out / f"{name}.json"),
               "--md", str(out / f"{name}.md")]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.is_file() else None
        md = (out / f"{name}.md").read_text() if (out / f"{name}.md").is_file() else ""
        results[name] = (proc.returncode, data, output, md)
    return results


def test_bench_qmatmul_tiny_writes_expected_json(smoke_runs):
    code, data, output, md = smoke_runs["bench_qmatmul"]
    assert code == 0, output[-3000:]
    assert {"machine", "settings", "rows", "summary", "gpu"} <= set(data)
    assert data["machine"]["cpu"] and data["machine"]["copy_gbps"]["1"] > 0
    assert data["settings"]["preset"] == "tiny"
    # 2 shapes x 2 M x 1 thread x 2 activation dtypes x 2 bit widths
    assert len(data["rows"]) == 16
    for row in data["rows"]:
        assert {"model", "K", "N", "M", "threads", "bits", "group_size", "act", "path", "ms", "gbps", "pct_copy_bw",
                "baseline_ms", "speedup", "over_dense_same_dtype"} <= set(row)
        assert set(row["speedup"]) == {"fp32", "bf16", "int8-dyn", "aten-int4"}
        assert row["ms"] > 0 and all(v > 0 for v in row["baseline_ms"].values())
        assert row["K"] % row["group_size"] == 0
    assert {r["group_size"] for r in data["rows"] if r["K"] == 96} == {32}     # 128 does not divide 96
    assert any(r["dequant_ms"] is not None for r in data["rows"] if r["M"] == 3)
    # No large-v3 shape in a --tiny run: every target is reported as not measured, none passes.
    summary = data["summary"]
    assert summary["n_pass"] == summary["n_fail"] == 0 and not summary["all_pass"]
    assert all(c["status"] == "n/a" for c in summary["checks"])
    if not torch.cuda.is_available():
        assert data["gpu"]["available"] is False and "no CUDA device" in data["gpu"]["reason"]
    assert "Targets (1 threads (they are defined at 2 threads" in md and "issue" not in md and "Machine:" in md


def test_bench_e2e_tiny_writes_expected_json(smoke_runs):
    code, data, output, md = smoke_runs["bench_e2e"]
    assert code == 0, output[-3000:]
    assert {"machine", "settings", "models", "summary"} <= set(data)
    toy = data["models"]["toy"]
    assert set(toy["variants"]) == {"fp32", "w4", "w3", "bf16"}
    for variant in toy["variants"].values():
        assert set(variant["timing"]) == {"1", "2"}
        for timing in variant["timing"].values():
            keys = {"encoder_s", "decode_s", "prefill_s", "step_ms", "tokens_per_s", "steady_tokens_per_s"}
            assert keys <= set(timing)
            assert timing["encoder_s"] > 0 and timing["tokens_per_s"] > 0
    assert set(toy["speedup_vs_fp32"]) == {"w4", "w3", "bf16"}
    assert set(toy["decoder_step_weights_mb"]) == {"fp32", "output_projection_fp32", "w4", "w3"}
    weights_mb = toy["decoder_step_weights_mb"]
    assert weights_mb["w3"] < weights_mb["w4"] < weights_mb["fp32"]
    # The greedy check is real even on the toy model: cpu backend and torch reference agree.
    for label in ("w4", "w3"):
        check = toy["checks"][label]
        assert check["equal"], check
        assert check["batch"] == 2 and check["tokens"] == 4 and check["encoder_max_rel_diff"] < 1e-4
    names = [c["name"] for c in data["summary"]["checks"]]
    assert "toy w4: greedy ids cpu backend == torch reference" in names
    assert "Greedy ids, backend cpu vs torch reference" in md


@pytest.fixture
def bench_qmatmul_module():
    """benchmarks/bench_qmatmul.py imported as a module (its folder on sys.path for `_common`)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_qmatmul")
    finally:
        sys.path.remove(str(BENCH))


def _row(module, k, n, m, bits, act, ms, base, pct=80.0):
    return {"model": module.TARGET_MODEL, "K": k, "N": n, "M": m, "threads": 2, "bits": bits, "act": act, "ms": ms,
            "gbps": 1.0, "pct_copy_bw": pct, "path": "fused", "baseline_ms": base,
            "speedup": {name: v / ms for name, v in base.items()},
            "over_dense_same_dtype": ms / base["bf16" if act == "bf16" else "fp32"]}


def test_summarize_targets_pass_and_fail_on_the_numbers(bench_qmatmul_module):
    b = bench_qmatmul_module
    base = {"fp32": 1.0, "bf16": 0.6, "int8-dyn": 0.4, "aten-int4": 0.5}
    rows = []
    for k, n in b.TARGET_SHAPES:
        rows.append(_row(b, k, n, 1, 4, "fp32", 0.1, base))        # 10x fp32, 4x int8, 5x int4
        rows.append(_row(b, k, n, 1, 3, "fp32", 0.08, base))
        rows.append(_row(b, k, n, 1500, 4, "fp32", 0.98, base))    # 0.98x the fp32 GEMM: within 1.0
    summary = b.summarize(rows, [1, 2])
    assert summary["threads"] == 2
    assert summary["n_fail"] == 0 and summary["n_not_measured"] == 0 and summary["all_pass"], summary

    slow = dict(base, **{"aten-int4": 0.15})                      # ours only 1.5x aten-int4
    rows = [_row(b, 1280, 5120, 1, 4, "fp32", 0.1, slow, pct=65.0),
            _row(b, 1280, 5120, 1, 3, "fp32", 0.12, slow),         # 3-bit slower than 4-bit
            _row(b, 1280, 5120, 1500, 4, "bf16", 0.75, base)]     # 1.25x the bf16 GEMM
    summary = b.summarize(rows, [2])
    status = {c["name"]: c["status"] for c in summary["checks"]}
    failed = {name for name, s in status.items() if s == "FAIL"}
    assert any("% of copy bandwidth" in name and "1280->5120" in name for name in failed)
    assert any("over aten-int4" in name and "1280->5120" in name for name in failed)
    assert any("3-bit time" in name and "1280->5120" in name for name in failed)
    assert any("M=1500, bf16 act" in name for name in failed)
    assert all(s == "n/a" for name, s in status.items() if "5120->1280, M=1" in name)
    assert not summary["all_pass"]
    assert "FAIL" in b.format_summary(summary)


def test_summarize_states_the_read_roofline_ceiling_of_peer_speedups(bench_qmatmul_module):
    """ceiling = peer ms / (our bytes / read bandwidth): 2e6 bytes at 40 GB/s is 0.05 ms, so a
    0.4 ms int8-dyn allows 8x and a 0.5 ms aten-int4 10x."""
    b = bench_qmatmul_module
    base = {"fp32": 1.0, "bf16": 0.6, "int8-dyn": 0.4, "aten-int4": 0.5}
    rows = [dict(_row(b, 1280, 5120, 1, 4, "fp32", 0.1, base), weight_bytes=2_000_000)]
    details = {c["name"]: c["detail"] for c in b.summarize(rows, [2], {2: 40.0})["checks"]}
    int8 = next(d for name, d in details.items() if "over int8-dyn" in name and "1280->5120" in name)
    int4 = next(d for name, d in details.items() if "over aten-int4" in name and "1280->5120" in name)
    assert "ceiling at the read roofline (40.0 GB/s): 8.00x" in int8
    assert "ceiling at the read roofline (40.0 GB/s): 10.00x" in int4
    assert all("ceiling" not in c["detail"] for c in b.summarize(rows, [2])["checks"])


def test_gpu_rows_under_the_triton_interpreter(bench_qmatmul_module, monkeypatch):
    """run_gpu's bookkeeping on CPU tensors through the Triton interpreter (the CUDA path needs a GPU)."""
    pytest.importorskip("triton")
    from fade_kernels.ops import triton_qmatmul

    if not triton_qmatmul._interpret_mode():
        pytest.skip("TRITON_INTERPRET was not set before the kernels were imported")
    b = bench_qmatmul_module
    args = b.parse_args(["--tiny", "--bits", "3", "--m", "2"])
    args.gpu_iters = 1
    rows = b.run_gpu(args, {"toy": [("96->64", 96, 64)]}, torch.device("cpu"), ("triton",), 10.0, 1 << 20)
    assert len(rows) == 1
    row = rows[0]
    assert row["backend"] == "triton" and row["group_size"] == 32 and row["ms"] > 0 and row["dense_ms"] > 0
    assert row["weight_bytes"] == 96 * 3 // 8 * 64 + 3 * 64 * 2 + 3 * 2 * 3 * 4


def test_bench_e2e_transcribe_scores_our_row_and_skips_missing_faster_whisper(tmp_path):
    """One espeak-ng utterance through bundled:tiny.en (a subprocess row) and a missing venv."""
    from fade_kernels.data.synth import SynthesisUnavailable, synthesize_espeak

    try:
        from fade_kernels.models.bundled import resolve_model

        resolve_model("bundled:tiny.en")
        audio = synthesize_espeak("The lazy dog sleeps.", speed=150)
    except (ModuleNotFoundError, FileNotFoundError, SynthesisUnavailable) as exc:
        pytest.skip(str(exc))
    import soundfile as sf

    sf.write(tmp_path / "a.wav", audio, 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav", "text": "The lazy dog sleeps.", "subset": "x"}) + "\n")
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(BENCH / "bench_e2e_transcribe.py"), "--manifest", str(manifest), "--max-utts", "1",
           "--threads", "1", "--batch", "1", "--dtypes", "fp32", "--fw-venv", str(tmp_path / "none"), "--json", str(out),
           "--temperature-fallback"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["temperature_fallback"] is True
    assert data["read_gb_s"]["1"] > 0
    (row,) = data["rows"]
    assert row["system"] == "ours bundled:tiny.en fp32 (lean)" and row["seconds"] > 0 and row["tokens"] > 0
    assert 0.0 <= row["wer"] <= 0.5
    assert "faster-whisper rows skipped" in data["skipped"]
