#!/usr/bin/env bash
# Creates .venv (if missing) and installs classify-app with the given extra (default: local).
# torch and torchvision are pinned to the pair that this machine's package mirror carries.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-local}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv ..."
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip setuptools wheel
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "Installing torch and torchvision (a few minutes the first time) ..."
    .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
echo "Installing classify-app[$extra] ..."
.venv/bin/pip install --quiet -e ".[$extra]"
