#!/usr/bin/env bash
# The GPU check, in one go (about 6 minutes on an H200 machine): the bare model at batch 16,
# 64 and 128 in fp16, then the pipeline with 1, 2, 4 and 8 workers sharing the one GPU and the
# one local broker; one table at the end, and every run's JSON under OUT_DIR.
#
#   bench/gpu.sh [OUT_DIR]                      (default bench-results/gpu)
#
# Runs with $PYTHON (default python3), which must hold PyTorch with CUDA. What else the worker
# needs comes from ./.whl when that folder exists (`bench/gpu-wheels.sh` fills it, here, for a
# machine with no network), installed into a scratch folder, never into that Python.
# Each worker gets one inference stream and one torch thread (the GPU does the work; the cores
# are for decoding, Kafka and HTTP), two decode threads, and batches of up to 32; four
# processes serve the photos, so that the load generator does not cap the workers. Each
# pipeline run has RUN_LIMIT_S seconds (default 120): one that hangs costs its row, not the
# check. GPU_CHECK_ENV="NAME=VALUE ..." adds worker settings to every run (for instance
# CLASSIFY_TABLE_STANDBY_REPLICAS=0: workers on one host need no warm copies of each other's
# tables, which cost two workers on two cores 6-10 % of their images/s).
# Without a GPU it runs too, on the CPU, as a smoke test of the script (GPU_CHECK_QUICK=1 makes
# every run short).
set -euo pipefail
out=${1:-bench-results/gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/classify-gpu-site .whl/*.whl
    export PYTHONPATH=/tmp/classify-gpu-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1

device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
if [ "$device" = cuda ]; then precision=fp16; else precision=fp32; fi
ads=4000 warm_up=400 rate=50 seconds=10 rounds=20 workers="1 2 4 8" sizes=16,64,128
if [ "${GPU_CHECK_QUICK:-}" = 1 ]; then
    ads=60 warm_up=20 rate=10 seconds=2 rounds=2 workers="1 2" sizes=8
fi
limit=${RUN_LIMIT_S:-120}
extra=()
for setting in ${GPU_CHECK_ENV:-}; do extra+=(--env "$setting"); done
echo "device $device, precision $precision, $(nproc) cores; extra settings: ${GPU_CHECK_ENV:-none}"
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    # Each process's GPU memory, its CUDA context included (torch's own peak leaves it out).
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -l 1 \
        >"$out/gpu-processes.csv" 2>/dev/null &
    sampler=$!
    trap 'kill $sampler 2>/dev/null || true' EXIT
fi

"$python" bench/model.py --device "$device" --precision "$precision" --batch-sizes "$sizes" \
    --rounds "$rounds" --out "$out/model.json" 2>&1 | tail -n 8 || echo "the bare model failed"

for count in $workers; do
    echo "$count worker(s):"
    timeout --kill-after 10 "$limit" "$python" bench/pipeline.py --workers "$count" \
        --ads "$ads" --warm-up "$warm_up" --rate "$rate" --seconds "$seconds" \
        --model-rounds 0 --image-processes 4 \
        --env CLASSIFY_DEVICE="$device" --env CLASSIFY_PRECISION="$precision" \
        --env CLASSIFY_INFERENCE_THREADS=1 --env CLASSIFY_TORCH_THREADS=1 \
        --env CLASSIFY_DECODE_THREADS=2 --env CLASSIFY_BATCH_MAX_SIZE=32 "${extra[@]}" \
        --out "$out/pipeline-$count.json" >"$out/pipeline-$count.log" 2>&1 || {
        echo "  failed or out of time (exit $?); the end of its log:"
        tail -n 6 "$out/pipeline-$count.log"
        pkill -f "classify_app worker" || true  # what a killed run left behind
        sleep 5
    }
    grep -E "^(pipeline|results|model inside|latency|CPU ms|worker RSS)" "$out/pipeline-$count.log" || true
done

"$python" - "$out" $workers <<'EOF'
import json
import sys
from pathlib import Path

out, counts = Path(sys.argv[1]), sys.argv[2:]
best = None
if (out / "model.json").exists():
    model = json.loads((out / "model.json").read_text())
    best = max(row["images_per_second"] for row in model["batches"])
    print(f"\nbare model ({model['device']}, {model['precision']}): " + ", ".join(
        f"batch {row['batch_size']}: {row['images_per_second']:,.0f} images/s"
        + (f" ({row['peak_gpu_memory_mb']} MB GPU)" if row.get("peak_gpu_memory_mb") else "")
        for row in model["batches"]))
samples = out / "gpu-processes.csv"
if samples.exists():
    used = [int(line.split(",")[1]) for line in samples.read_text().splitlines()
            if line.count(",") == 1 and line.split(",")[1].strip().isdigit()]
    if used:
        print(f"the most GPU memory one process held, CUDA context included (nvidia-smi): "
              f"{max(used):,} MiB")
print("| workers | images/s | images/min | of the best bare batch | p50 / p95 / p99 at the rate | "
      "CPU ms/image outside the model (worker, broker, load generator) | peak GPU MB per worker | RSS per worker |")
print("|---|---|---|---|---|---|---|---|")
where = []  # where each run's time went, printed after the table
for count in counts:
    path = out / f"pipeline-{count}.json"
    if not path.exists():
        print(f"| {count} | did not finish (pipeline-{count}.log) | | | | | | |")
        continue
    run = json.loads(path.read_text())
    t, lat, cpu = run["throughput"], run["latency"], run["throughput"]["cpu_ms_per_image"]
    where.append(f"{count} worker(s): mean batch {t['mean_batch_size']}, "
                 f"{t['model_batches_running']} batches running on average; CPU % "
                 f"{t['cpu_percent']}; worker ms/image by thread {cpu['worker_threads']}")
    gpu = run["worker_device"].get("peak_gpu_memory_mb", "-")
    print(f"| {count} | {t['images_per_second']:,.0f} | {60 * t['images_per_second']:,.0f} | "
          f"{'-' if best is None else format(t['images_per_second'] / best, '.0%')} | {lat['p50_ms']} / {lat['p95_ms']} / {lat['p99_ms']} ms | "
          f"{cpu['outside_model']} ({cpu['worker_outside_model']}, {cpu['broker']}, {cpu['load_generator']}) | "
          f"{gpu} | {max(run['worker_rss_mb']['peak'])} MB |")
print("\n".join(where))
EOF
