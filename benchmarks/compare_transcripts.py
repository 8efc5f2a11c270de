"""Compare the transcripts of two `fade eval --json` runs on the same utterances.

Prints how many hypotheses differ (overall and per subset), both runs' WER per subset, and the
first differing pairs. Used to show what a kernel choice changes in greedy transcripts, e.g.

    FADE_CPU_ACTIVATIONS=fp32 fade eval --model CKPT --manifest EVAL.jsonl --batch-size 8 --json fp32.json
    FADE_CPU_ACTIVATIONS=int8 fade eval --model CKPT --manifest EVAL.jsonl --batch-size 8 --json int8.json
    python benchmarks/compare_transcripts.py fp32.json int8.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "utterances" not in data:
        sys.exit(f"compare_transcripts: {path} has no per-utterance list (write it with fade eval --json)")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="fade eval --json output (the reference)")
    parser.add_argument("second", help="fade eval --json output on the same utterances")
    parser.add_argument("--show", type=int, default=5, help="differing pairs to print")
    args = parser.parse_args(argv)
    a, b = load(args.first), load(args.second)
    hyps_a = {u["id"]: u for u in a["utterances"]}
    hyps_b = {u["id"]: u for u in b["utterances"]}
    if hyps_a.keys() != hyps_b.keys():
        sys.exit("compare_transcripts: the two runs cover different utterances")
    differing = [key for key in hyps_a if hyps_a[key]["hyp"] != hyps_b[key]["hyp"]]
    per_subset = Counter(hyps_a[key].get("subset") for key in differing)
    totals = Counter(u.get("subset") for u in hyps_a.values())
    print(f"{len(differing)} of {len(hyps_a)} transcripts differ; WER {a['wer'] * 100:.2f}% -> {b['wer'] * 100:.2f}%")
    for subset in sorted(totals, key=str):
        wer_a = a.get("subsets", {}).get(subset, {}).get("wer")
        wer_b = b.get("subsets", {}).get(subset, {}).get("wer")
        wers = f"; WER {wer_a * 100:.2f}% -> {wer_b * 100:.2f}%" if wer_a is not None and wer_b is not None else ""
        print(f"  {subset}: {per_subset.get(subset, 0)} of {totals[subset]} differ{wers}")
    for key in differing[: args.show]:
        print(f"  {key}\n    {hyps_a[key]['hyp']}\n    {hyps_b[key]['hyp']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
