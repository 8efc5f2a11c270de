#!/usr/bin/env bash
# Create .venv with the pinned dependencies and build fade-kernels (with its C++ extension)
# against the installed torch. torch is pinned to the CPU wheel first, so nothing can pull a
# multi-GB CUDA build; --no-build-isolation makes the extension link against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>&1 | grep -v "is ignored" || true
$PIP install "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
$PIP install -r .ci/requirements.txt 2>&1 | grep -v "is ignored" || true
$PIP install --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
# espeak-ng synthesises part of the dev set; install it where we may (root on Debian).
if ! command -v espeak-ng >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
    || echo "install.sh: could not install espeak-ng; the dev set will use Piper only" >&2
fi
"$VENV/bin/fade" info
