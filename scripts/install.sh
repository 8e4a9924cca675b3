#!/usr/bin/env bash
# Creates .venv (if missing) and installs classify-app with the given extra (default: local).
#
# torch: on a machine with an NVIDIA GPU, the CUDA build (torch 2.14.1, torchvision 0.29.1);
# without one, the CPU build, which saves each worker about 300 MB of RSS (importing the CUDA
# build maps its CUDA libraries: 727 against 224 MB; a ready worker 799 against 506 MB here;
# README, "Performance"). The CPU pair is torch 2.13.0+cpu and torchvision 0.28.0 (the wheel
# our development machines keep on disk; where the usual indexes lack it, PyTorch's CPU index
# has both).
# `CLASSIFY_TORCH=cuda` or `cpu` chooses instead. The worker never imports torchvision: it only
# reads ImageNet's class names from it.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-local}"
python="${PYTHON:-python3}"
flavour="${CLASSIFY_TORCH:-}"
if [ -z "$flavour" ]; then
    if nvidia-smi -L >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
fi
case "$flavour" in
    cuda | cpu) ;;
    *) echo "CLASSIFY_TORCH must be cuda or cpu, not $flavour" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv ..."
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip setuptools wheel
fi
# torchvision is looked for, not imported: PyPI's build does not import beside the CPU torch.
if ! .venv/bin/python -c "import torch, importlib.util as u; assert u.find_spec('torchvision')" \
    2>/dev/null; then
    echo "Installing torch and torchvision ($flavour build; a few minutes the first time) ..."
    case "$flavour" in
        cuda) .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 ;;
        cpu)
            wheels=(torch==2.13.0+cpu torchvision==0.28.0)
            .venv/bin/pip install --quiet "${wheels[@]}" 2>/dev/null \
                || .venv/bin/pip install --quiet "${wheels[@]}" \
                    --index-url https://download.pytorch.org/whl/cpu
            ;;
    esac
fi
echo "Installing classify-app[$extra] ..."
.venv/bin/pip install --quiet -e ".[$extra]"
