"""benchmarks/compare_transcripts.py counts differing hypotheses overall and per subset."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.skipif(not (BENCH / "compare_transcripts.py").is_file(),
                                reason="benchmarks/ not in this checkout")


def _run(utterances, wer):
    subsets = {s: {"wer": wer} for s in {u["subset"] for u in utterances}}
    return {"wer": wer, "subsets": subsets, "utterances": utterances}


def test_counts_differing_transcripts_per_subset(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import compare_transcripts
    finally:
        sys.path.remove(str(BENCH))
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    first = [{"id": f"u{i}", "subset": rng.choice(["real", "noisy"]), "ref": "a b", "hyp": f"words {i}"}
             for i in range(40)]
    changed = set(rng.sample(range(40), 7))
    second = [{**u, "hyp": u["hyp"] + (" x" if i in changed else "")} for i, u in enumerate(first)]
    (tmp_path / "a.json").write_text(json.dumps(_run(first, 0.1)))
    (tmp_path / "b.json").write_text(json.dumps(_run(second, 0.2)))
    assert compare_transcripts.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--show", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "7 of 40 transcripts differ; WER 10.00% -> 20.00%", f"seed {seed}"
    for subset in ("noisy", "real"):
        n = sum(1 for i in changed if first[i]["subset"] == subset)
        total = sum(1 for u in first if u["subset"] == subset)
        assert f"  {subset}: {n} of {total} differ; WER 10.00% -> 20.00%" in out, f"seed {seed}"

    (tmp_path / "c.json").write_text(json.dumps(_run(first[:-1], 0.1)))
    with pytest.raises(SystemExit, match="different utterances"):
        compare_transcripts.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
