#!/usr/bin/env bash
# The README's first command: install, build a small calibration set, quantize the bundled
# Whisper tiny.en to 4 bits with GPTQ, and transcribe held-out speech with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash python/install.sh
.venv/bin/python python/make_devset.py --out devset --max-sentences 60
.venv/bin/fade quantize --model bundled:tiny.en --method gptq --bits 4 --group-size 128 \
  --calib devset/calib.jsonl --n-calib 32 --seed 0 --out out/tiny.en-gptq-w4g128
.venv/bin/fade transcribe --model out/tiny.en-gptq-w4g128 $(.venv/bin/python -c "
import json; lines = open('devset/eval.jsonl').read().splitlines()[:3]
print(' '.join('devset/' + json.loads(l)['audio'] for l in lines))")
