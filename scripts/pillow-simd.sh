#!/usr/bin/env bash
# Replaces Pillow with pillow-simd (the same API, its resize vectorised with AVX2) in a Python
# environment: decoding and resizing a photo of the sample size costs a third less CPU (4.2 ->
# 3.0 ms in the pipeline; README, "Performance"), with the same labels (`bench/labels.py`).
#   scripts/pillow-simd.sh [PYTHON]        (default .venv/bin/python)
# pillow-simd ships as source only: this builds it (a C compiler and the libjpeg and zlib
# headers are needed; about 2 minutes), and the result runs only on CPUs with AVX2 (x86-64
# since 2013). Any later `pip install` that pulls Pillow in again undoes it.
set -euo pipefail
python=${1:-.venv/bin/python}
version=12.1.1.post0
if ! grep -qw avx2 /proc/cpuinfo; then
    echo "this CPU has no AVX2: keeping Pillow" >&2
    exit 1
fi
"$python" -m pip uninstall --quiet --yes pillow pillow-simd
CC="${CC:-cc} -mavx2" "$python" -m pip install --quiet --no-cache-dir --no-binary pillow-simd \
    "pillow-simd==$version"
"$python" -c 'import PIL, PIL.Image, PIL.features; assert PIL.features.check("jpg"); print("PIL", PIL.__version__)'
