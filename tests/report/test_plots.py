"""report.plots: every plot writes a real PNG from reports in both forms (object and dict)."""
import struct

import numpy as np
import pytest

from fade_kernels.report import plots


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def make_report(method="fade", seed=0, with_fp=True, with_alpha=True):
    """A report dict (QuantizationReport.to_dict() form): 2 encoder + 2 decoder blocks x 2 layers."""
    rng = np.random.default_rng(seed)
    layers = []
    for stack in ("encoder", "decoder"):
        for block in range(2):
            for name in ("self_attn.q_proj", "fc2"):
                error = float(rng.uniform(0.02, 0.2))
                layers.append({
                    "name": f"model.{stack}.layers.{block}.{name}", "shape": [64, 64], "rel_output_error": error,
                    "valid_row_fraction": 0.5, "stack": stack, "block": block,
                    "rel_error_fp": error * 1.5 if with_fp else None,
                    "rel_error_fp_uncorrected": error * 2 if with_fp else None,
                    "propagated_error": 0.1 if with_fp else None,
                    "alpha": float(rng.uniform()) if with_alpha else None,
                    "rho": float(rng.uniform()) if with_alpha else None,
                    "vulnerability": 1.0 if with_alpha else None})
    return {"config": {"method": method, "bits": 4, "group_size": 128}, "seconds": 1.0, "peak_rss_mb": 1.0,
            "n_calib": 4, "layers": layers}


@pytest.mark.slow
def test_per_layer_plots_write_pngs(tmp_path):
    fade = [make_report("fade", seed) for seed in range(3)]
    gptq = make_report("gptq", 9, with_fp=False, with_alpha=False)
    for path in (plots.plot_alpha_per_layer(fade[0], tmp_path / "a1.png"),
                 plots.plot_alpha_per_layer(fade, tmp_path / "a3.png"),
                 plots.plot_alpha_per_layer({"fade": fade, "qep": make_report("qep", 5)}, tmp_path / "am.png"),
                 plots.plot_rho_per_layer(fade, tmp_path / "rho.png"),
                 plots.plot_error_vs_depth({"gptq": gptq, "fade": fade}, tmp_path / "sub" / "err.png")):
        width, height = png_size(path)
        assert width > 300 and height > 200


def test_quantization_report_objects_are_accepted(tmp_path):
    from fade_kernels.api import QuantizationReport

    report = QuantizationReport.from_dict(make_report())
    assert plots.has_field(report, "alpha")
    path = plots.plot_alpha_per_layer(report, tmp_path / "alpha.png")
    assert path == tmp_path / "alpha.png" and png_size(path)[0] > 0


def test_missing_field_is_an_error_and_has_field_says_so(tmp_path):
    gptq = make_report("gptq", with_fp=False, with_alpha=False)
    assert not plots.has_field(gptq, "alpha") and not plots.has_field([gptq, gptq], "rho")
    assert plots.has_field({"fade": make_report()}, "rho")
    with pytest.raises(ValueError, match="alpha"):
        plots.plot_alpha_per_layer(gptq, tmp_path / "x.png")
    with pytest.raises(TypeError, match="mapping"):
        plots.plot_error_vs_depth(gptq, tmp_path / "x.png")


def test_error_vs_depth_uses_the_full_precision_error_when_recorded():
    with_fp, without = make_report(with_fp=True), make_report(with_fp=False)
    names = [layer["name"] for layer in with_fp["layers"]]
    fields = ("rel_error_fp", "rel_output_error")
    got = plots._matrix([with_fp["layers"]], fields, names)[0]
    np.testing.assert_array_equal(got, [layer["rel_error_fp"] for layer in with_fp["layers"]])
    got = plots._matrix([without["layers"]], fields, names)[0]
    np.testing.assert_array_equal(got, [layer["rel_output_error"] for layer in without["layers"]])


def test_layers_are_matched_by_name_across_reports():
    a = make_report(seed=1)
    b = make_report(seed=2)
    b["layers"] = b["layers"][::-1]            # another order must not shuffle the values
    names = [layer["name"] for layer in a["layers"]]
    values = plots._matrix([a["layers"], b["layers"]], "alpha", names)
    by_name = {layer["name"]: layer["alpha"] for layer in b["layers"]}
    np.testing.assert_array_equal(values[1], [by_name[n] for n in names])


def test_wer_per_method_seed(tmp_path):
    runs = {}
    for bits in (4, 3):
        runs[f"rtn/w{bits}/seedany"] = {"method": "rtn", "bits": bits, "seed": None, "wer": 0.3}
        for seed in range(3):
            runs[f"gptq/w{bits}/seed{seed}"] = {"method": "gptq", "bits": bits, "seed": seed, "wer": 0.2 + 0.01 * seed}
    results = {"runs": runs, "fp": {"wer": 0.15}}
    width, height = png_size(plots.plot_wer_per_method_seed(results, tmp_path / "wer.png"))
    assert width > height > 200
    assert png_size(plots.plot_wer_per_method_seed(list(runs.values()), tmp_path / "wer2.png"))[0] > 0
    with pytest.raises(ValueError, match="no runs"):
        plots.plot_wer_per_method_seed({"runs": {}}, tmp_path / "none.png")


@pytest.mark.slow
def test_write_report_plots(tmp_path):
    paths = plots.write_report_plots(make_report(), tmp_path)
    assert [p.name for p in paths] == ["error_vs_depth.png", "alpha_per_layer.png", "rho_per_layer.png"]
    paths = plots.write_report_plots(make_report("gptq", with_fp=False, with_alpha=False), tmp_path / "g")
    assert [p.name for p in paths] == ["error_vs_depth.png"]
