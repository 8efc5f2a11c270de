"""benchmarks/real_vs_synthetic.py pools the synthetic subsets' edit counts and keeps the real
recordings apart; the table holds mean ± std over seeds."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.skipif(not (BENCH / "real_vs_synthetic.py").is_file(), reason="benchmarks/ not in this checkout")


@pytest.fixture(scope="module")
def rvs():
    sys.path.insert(0, str(BENCH))
    try:
        import real_vs_synthetic
    finally:
        sys.path.remove(str(BENCH))
    return real_vs_synthetic


def _record(counts: dict[str, tuple[int, int]]) -> dict:
    subsets = {name: {"substitutions": e, "deletions": 0, "insertions": 0, "ref_words": w, "wer": e / w}
               for name, (e, w) in counts.items()}
    errors = sum(e for e, _ in counts.values())
    return {"wer": errors / sum(w for _, w in counts.values()), "subsets": subsets}


def test_split_pools_counts(rvs):
    r = random.Random()
    counts = {name: (r.randint(0, 30), r.randint(31, 90)) for name in ("real", "piper", "espeak", "noisy")}
    got = rvs.split_wer(_record(counts))
    synthetic_errors = sum(counts[n][0] for n in ("piper", "espeak", "noisy"))
    synthetic_words = sum(counts[n][1] for n in ("piper", "espeak", "noisy"))
    assert got["real"] == pytest.approx(100 * counts["real"][0] / counts["real"][1], rel=1e-12)
    assert got["synthetic"] == pytest.approx(100 * synthetic_errors / synthetic_words, rel=1e-12)
    assert rvs.split_wer(_record({"piper": (1, 10)}))["real"] is None


def test_table_over_seeds(rvs, tmp_path):
    runs = {f"fade/w3/seed{s}": {"method": "fade", "bits": 3, "seed": s, **_record({"real": (e, 10), "piper": (1, 10)})}
            for s, e in ((0, 2), (1, 4))}
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text(json.dumps({"fp": _record({"real": (1, 10), "piper": (0, 10)}), "runs": runs}))
    assert rvs.main(["--out", str(tmp_path / "out"), f"m={sweep}"]) == 0
    table = (tmp_path / "out" / "real_vs_synthetic.md").read_text()
    assert "| m | fp32 | 32 | - | 5.0 | 10.0 | 0.0 |" in table
    assert "| m | fade | 3 | 0,1 | 20.0 ± 7.1 | 30.0 ± 14.1 | 10.0 ± 0.0 |" in table
