"""`fade sweep` and the new `fade quantize` options: one-line errors naming the option, and the
parsed values reach run_sweep / QuantConfig (the heavy work is replaced by recorders)."""
import json

import pytest

from fade_kernels.cli import main


@pytest.fixture
def manifests(tmp_path):
    calib, evaluation = tmp_path / "calib.jsonl", tmp_path / "eval.jsonl"
    calib.write_text("")
    evaluation.write_text("")
    return str(calib), str(evaluation)


@pytest.fixture
def recorded_sweep(monkeypatch):
    calls = []

    def fake_run_sweep(model, methods, bits, group_size, seeds, calib, evaluation, out, **kwargs):
        from pathlib import Path

        calls.append(dict(model=model, methods=methods, bits=bits, group_size=group_size, seeds=seeds, calib=calib,
                          eval=evaluation, out=out, **kwargs))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.md").write_text("| method | bits |\n")
        return {"runs": {}, "failed": {}}

    monkeypatch.setattr("fade_kernels.sweep.run_sweep", fake_run_sweep)
    return calls


def sweep_args(manifests, tmp_path, **overrides):
    args = {"--model": "m", "--methods": "rtn,gptq", "--bits": "4,3", "--seeds": "0,1", "--calib": manifests[0],
            "--eval": manifests[1], "--out": str(tmp_path / "out")}
    args.update(overrides)
    return [item for key, value in args.items() if value is not None for item in (key, value)]


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("option,value,expected", [
    ("--methods", "gptq,nope", "--methods: unknown value 'nope'"),
    ("--methods", "", "--methods must list at least one value"),
    ("--methods", "gptq,gptq", "--methods lists a value twice"),
    ("--bits", "4,5", "--bits: unknown value '5'"),
    ("--bits", "four", "--bits: 'four' is not a valid int"),
    ("--seeds", "", "--seeds must list at least one value"),
    ("--seeds", " , ", "--seeds must list at least one value"),
    ("--seeds", "0,x", "--seeds: 'x' is not a valid int"),
    ("--n-calib", "0", "--n-calib must be at least 1"),
    ("--max-eval", "0", "--max-eval must be at least 1"),
    ("--alpha", "1.5", "--alpha: alpha must be in [0, 1]"),
    ("--awq-grid", "0", "--awq-grid: awq_grid must be a positive integer"),
])
def test_sweep_bad_values_are_one_line_errors(capsys, tmp_path, manifests, recorded_sweep, option, value, expected):
    err = one_line_error(capsys, ["sweep"] + sweep_args(manifests, tmp_path, **{option: value}))
    assert expected in err and err.startswith("fade sweep: error:")
    assert recorded_sweep == []


def test_sweep_missing_manifests(capsys, tmp_path, manifests, recorded_sweep):
    missing = str(tmp_path / "nope.jsonl")
    assert f"--eval manifest not found: {missing}" in one_line_error(
        capsys, ["sweep"] + sweep_args(manifests, tmp_path, **{"--eval": missing}))
    assert f"--calib manifest not found: {missing}" in one_line_error(
        capsys, ["sweep"] + sweep_args(manifests, tmp_path, **{"--calib": missing}))
    argv = ["sweep"] + sweep_args(manifests, tmp_path, **{"--calib": None, "--methods": "rtn,qep,fade"})
    err = one_line_error(capsys, argv)
    assert "--calib is required for --methods qep,fade" in err
    assert recorded_sweep == []


def test_sweep_passes_parsed_values(capsys, tmp_path, manifests, recorded_sweep):
    options = {"--methods": "rtn, gptq,qep,fade,awq", "--bits": "4,3", "--seeds": "0,1,2,3,4", "--group-size": "64",
               "--n-calib": "16", "--max-eval": "10", "--alpha": "0.25", "--qep-exclude": "mlp_out,cross_kv",
               "--fade-rule": "reliability"}
    argv = ["sweep"] + sweep_args(manifests, tmp_path, **options)
    assert main(argv + ["--quiet"]) == 0
    (call,) = recorded_sweep
    assert call["methods"] == ["rtn", "gptq", "qep", "fade", "awq"] and call["bits"] == [4, 3]
    assert call["seeds"] == [0, 1, 2, 3, 4] and call["group_size"] == 64
    assert call["n_calib"] == 16 and call["max_eval"] == 10 and call["dequantize_eval"] is True
    assert call["progress"] is False
    assert call["config_kwargs"] == {"sym": False, "act_order": False, "damp": 0.01, "alpha": 0.25,
                                     "qep_exclude": ("mlp_out", "cross_kv"), "fade_rule": "reliability"}
    assert "| method | bits |" in capsys.readouterr().out


def test_sweep_rtn_only_needs_no_calibration(tmp_path, manifests, recorded_sweep):
    assert main(["sweep"] + sweep_args(manifests, tmp_path, **{"--calib": None, "--methods": "rtn"})) == 0
    assert recorded_sweep[0]["calib"] is None


@pytest.mark.parametrize("method", ["qep", "fade", "awq", "qep-rtn"])
def test_quantize_calibrated_methods_need_calib(capsys, method):
    err = one_line_error(capsys, ["quantize", "--model", "m", "--out", "o", "--method", method])
    assert f"--calib is required for --method {method}" in err


def test_quantize_bad_new_options(capsys):
    err = one_line_error(capsys, ["quantize", "--model", "m", "--out", "o", "--method", "rtn", "--alpha", "-0.1"])
    assert "--alpha: alpha must be in [0, 1]" in err
    err = one_line_error(capsys, ["quantize", "--model", "m", "--out", "o", "--method", "rtn", "--qep-damp", "0"])
    assert "--qep-damp: qep_damp must be positive" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", "m", "--out", "o", "--fade-rule", "neither"])
    assert exit_info.value.code == 2 and "--fade-rule" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_options_reach_the_config_and_report_dir(tmp_path, monkeypatch):
    import torch

    import fade_kernels.api as api
    import fade_kernels.cli as cli
    from fade_kernels.api import LayerReport, QuantizationReport

    seen = {}

    def fake_quantize(model, samples, config, batch_size=8, progress=True, **kwargs):
        seen["config"] = config
        layers = [LayerReport(f"model.{stack}.layers.{b}.fc1", (8, 8), 0.1 + 0.01 * b, 1.0, stack, b,
                              rel_error_fp=0.2, alpha=0.3, rho=0.5)
                  for stack in ("encoder", "decoder") for b in range(2)]
        return QuantizationReport(config=config.to_dict(), layers=layers, seconds=1.0, n_calib=1)

    monkeypatch.setattr(cli, "load_cli_model", lambda spec: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr(api, "quantize_model", fake_quantize)
    monkeypatch.setattr("fade_kernels.sweep.silence_samples", lambda model, processor: ["sample"])
    monkeypatch.setattr("fade_kernels.io.checkpoint.save_quantized",
                        lambda model, out, processor=None: out.mkdir(parents=True, exist_ok=True))
    report_dir = tmp_path / "report"
    argv = ["quantize", "--model", "m", "--method", "rtn", "--bits", "3", "--group-size", "64", "--alpha", "0.25",
            "--qep-damp", "0.01", "--qep-exclude", "mlp_out, cross_kv", "--fade-rule", "vulnerability",
            "--awq-grid", "5", "--out", str(tmp_path / "ckpt"), "--report", str(report_dir), "--quiet"]
    assert main(argv) == 0
    config = seen["config"]
    assert (config.method, config.bits, config.group_size) == ("rtn", 3, 64)
    assert (config.alpha, config.qep_damp, config.qep_exclude, config.fade_rule, config.awq_grid) == (
        0.25, 0.01, ("mlp_out", "cross_kv"), "vulnerability", 5)
    stored = json.loads((report_dir / "report.json").read_text())
    assert stored["config"]["alpha"] == 0.25 and len(stored["layers"]) == 4 and stored["model"] == "m"
    for name in ("error_vs_depth.png", "alpha_per_layer.png", "rho_per_layer.png"):
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"
