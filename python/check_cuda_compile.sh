#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (object files only, no GPU or CUDA
# torch needed) and fail on any error or warning, host or device side. .ci/run calls this before
# the tests; the kernels' arithmetic itself is exercised on the CPU by tests/ops/test_cuda_qgemv.py.
#
# It also syntax-checks the pybind11 binding csrc/bindings/cuda_bindings.cpp with the host
# compiler against the installed torch's headers (CPU wheels ship them too) and CUDA's
# cuda_runtime.h: nothing else compiles it on a machine without a CUDA torch.
#
#   bash python/check_cuda_compile.sh [--no-binding]   # NVCC=..., PYTHON=... (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
check_binding=1
[ "${1:-}" = "--no-binding" ] && check_binding=0

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null; then NVCC=$(command -v nvcc)
  elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
  else
    echo "check_cuda_compile: nvcc not found (not on PATH, not in \$CUDA_HOME/bin or /usr/local/cuda/bin);" \
         "install the CUDA toolkit or set NVCC=/path/to/nvcc" >&2
    exit 1
  fi
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files found" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
status=0
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src" .cu).o"
  # One invocation per file builds both architectures (the host pass runs once).
  # -Werror all-warnings: nvcc/ptxas warnings; -Xcompiler: the host compiler's, on the same code.
  if ! "$NVCC" -c "$src" -o "$obj" -std=c++17 -O3 -Icsrc/include -Icsrc/cuda \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror; then
    echo "check_cuda_compile: FAILED $src" >&2
    status=1
  else
    echo "check_cuda_compile: ok $src (sm_80, sm_90)"
  fi
done
echo "check_cuda_compile: ${#sources[@]} file(s) with $("$NVCC" --version | tail -1) in $(( $(date +%s) - start )) s"

if [ $check_binding = 1 ]; then
  start=$(date +%s)
  PYTHON=${PYTHON:-.venv/bin/python}
  [ -x "$PYTHON" ] || PYTHON=python3
  cuda_include=""
  for dir in "${CUDA_HOME:-}" "$(dirname "$(dirname "$NVCC")")" /usr/local/cuda; do
    if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime.h" ]; then cuda_include="$dir/include"; break; fi
  done
  if [ -z "$cuda_include" ]; then
    echo "check_cuda_compile: cuda_runtime.h not found (set CUDA_HOME to the CUDA toolkit)" >&2
    exit 1
  fi
  # -isystem: torch's own headers are not ours to keep warning-free; C++20 as torch 2.13 needs.
  if ! includes=$("$PYTHON" -c "import sysconfig; from torch.utils.cpp_extension import include_paths
print(' '.join(['-isystem ' + p for p in include_paths()] + ['-isystem ' + sysconfig.get_paths()['include']]))"); then
    echo "check_cuda_compile: $PYTHON cannot import torch to locate its headers (set PYTHON=...)" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  if ! "${CXX:-c++}" -fsyntax-only -std=c++20 -Wall -Wextra -Werror $includes -isystem "$cuda_include" \
        -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H csrc/bindings/cuda_bindings.cpp; then
    echo "check_cuda_compile: FAILED csrc/bindings/cuda_bindings.cpp" >&2
    status=1
  else
    echo "check_cuda_compile: ok csrc/bindings/cuda_bindings.cpp (syntax, torch headers) in $(( $(date +%s) - start )) s"
  fi
fi
exit $status
