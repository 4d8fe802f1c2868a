#!/usr/bin/env bash
# Create .venv with samseg and its pinned dependencies, in the order that avoids a 2.6 GB download:
# torch first, then sam2 built against it without build isolation, then samseg itself.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
export SAM2_BUILD_CUDA=0   # the optional CUDA extension only speeds up video post-processing; AMG does not use it
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip "setuptools>=69" wheel
fi
pip=("$VENV/bin/python" -m pip install -q)
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -c "import sam2" 2>/dev/null || "${pip[@]}" --no-build-isolation sam2==1.1.0
"${pip[@]}" --no-build-isolation -e ".[ops,dev,emulator]"
echo "samseg installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
