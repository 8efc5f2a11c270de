#!/usr/bin/env python
"""WER on real recordings and on synthetic speech, in separate columns, from `fade sweep` folders.

    python benchmarks/real_vs_synthetic.py --out DIR LABEL=SWEEP_DIR [LABEL=SWEEP_DIR ...]

Each SWEEP_DIR holds the results.json of one `fade sweep` (one model, one set of quantization
options); LABEL names that set in the table (e.g. "tiny.en", "tiny.en --clip hessian"). The
evaluation manifest's `subset` field says what each utterance is: "real" for recordings of
people (python/collect_real_speech.py), anything else (piper, espeak, noisy) is synthetic.
Synthetic WER pools the synthetic subsets' edit counts (errors / reference words over all of
them), like the overall WER, so it is not a mean of per-subset WERs.

Writes DIR/real_vs_synthetic.md (one row per label, method and bit width: WER % mean ± sample
std over calibration seeds, n seeds) and DIR/real_vs_synthetic.json (the same numbers and the
per-seed values).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REAL_SUBSETS = ("real",)


def split_wer(record: dict) -> dict[str, float | None]:
    """{"all", "real", "synthetic"} WER % of one evaluation record (a sweep run or its fp entry);
    None for a part the evaluation set does not have."""
    parts = {"real": [0, 0], "synthetic": [0, 0]}  # [errors, reference words]
    for name, sub in record["subsets"].items():
        part = parts["real" if name in REAL_SUBSETS else "synthetic"]
        part[0] += sub["substitutions"] + sub["deletions"] + sub["insertions"]
        part[1] += sub["ref_words"]
    out = {"all": 100.0 * record["wer"]}
    for name, (errors, words) in parts.items():
        out[name] = 100.0 * errors / words if words else None
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(label: str, results: dict) -> list[dict]:
    """Rows for one sweep: fp32 first, then each (method, bits) with per-seed WERs."""
    rows = []
    if results.get("fp"):
        rows.append({"label": label, "method": "fp32", "bits": 32, "seeds": ["-"],
                     "wer": {k: [v] for k, v in split_wer(results["fp"]).items()}})
    grouped: dict[tuple[str, int], dict] = {}
    for run in results["runs"].values():
        key = (run["method"], run["bits"])
        row = grouped.setdefault(key, {"label": label, "method": run["method"], "bits": run["bits"], "seeds": [],
                                       "wer": {"all": [], "real": [], "synthetic": []}})
        # Data-free methods (RTN) record no seed: one model serves every seed.
        row["seeds"].append(run.get("seed") if run.get("seed") is not None else "any")
        for part, value in split_wer(run).items():
            row["wer"][part].append(value)
    rows += [grouped[k] for k in sorted(grouped, key=lambda k: (-k[1], k[0]))]
    return rows


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def write_tables(rows: list[dict], out: Path, sources: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| setting | method | bits | seeds | ALL WER % | real WER % | synthetic WER % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ",".join(str(s) for s in r["seeds"])
        lines.append(f"| {r['label']} | {r['method']} | {r['bits']} | {seeds} | {_cell(r['wer']['all'])} | "
                     f"{_cell(r['wer']['real'])} | {_cell(r['wer']['synthetic'])} |")
    (out / "real_vs_synthetic.md").write_text("\n".join(lines) + "\n")
    (out / "real_vs_synthetic.json").write_text(json.dumps({"sources": sources, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for real_vs_synthetic.{md,json}")
    ap.add_argument("sweeps", nargs="+", metavar="LABEL=SWEEP_DIR")
    args = ap.parse_args(argv)
    rows, sources = [], {}
    for item in args.sweeps:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            ap.error(f"sweeps: expected LABEL=SWEEP_DIR, got {item!r}")
        path = Path(folder) / "results.json"
        if not path.is_file():
            ap.error(f"sweeps: no results.json in {folder}")
        results = json.loads(path.read_text())
        sources[label] = {"settings": results.get("settings"), "meta": results.get("meta")}
        rows += summarize(label, results)
    write_tables(rows, Path(args.out), sources)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
