"""Bare-model benchmark: images/s and latency per batch size, through the worker's own code.

    python bench/model.py [--device auto] [--precision auto] [--graph script|eager]
                          [--threads N] [--batch-sizes 1,8,16,32] [--rounds 10] [--out FILE]

Loads the configured model exactly as a worker does (`models.create_model` + `load`, with the
worker's `CLASSIFY_*` settings as defaults), checks
that the sample photos still get their expected top labels on this device and precision,
warms every batch shape, then times `--rounds` batches per size (median). On CUDA it also
reports the peak GPU memory (`torch.cuda.max_memory_allocated`). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from classify_app.dev.images import sample_pixels
from classify_app.settings import Settings
from models import create_model
from models.runtime import available_cpus

EXPECTED = {
    "coffee": {"espresso", "cup"},
    "chelsea": {"tiger cat", "Egyptian cat", "tabby"},
    "camera": {"tripod"},
    "motorcycle": {"moped", "motor scooter"},
}


def main() -> None:
    """Run the benchmark, print a table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings = Settings.from_env()  # the worker's settings: same model, device, graph, threads
    parser.add_argument("--model", default=settings.model)
    parser.add_argument("--device", default=settings.device)
    parser.add_argument("--precision", default=settings.precision)
    parser.add_argument("--graph", default=settings.model_graph, help="onnx, script or eager")
    parser.add_argument("--threads", type=int, default=settings.torch_threads, help="0: cores")
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="bench-results/model.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads or available_cpus())
    model = create_model(args.model, device=args.device, precision=args.precision, graph=args.graph)
    started = time.perf_counter()
    model.load()
    load_seconds = time.perf_counter() - started
    photos = [sample_pixels(model, name) for name in EXPECTED]
    predictions = model.predict_batch(np.stack(photos))
    labels = {name: p.labels[0].name for name, p in zip(EXPECTED, predictions, strict=True)}
    sensible = all(labels[name] in EXPECTED[name] for name in EXPECTED)

    cuda = model.device.startswith("cuda")
    rows = []
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        batch = np.stack([photos[i % len(photos)] for i in range(batch_size)])
        for _ in range(3):
            model.predict_batch(batch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.rounds):
            begin = time.perf_counter()
            model.predict_batch(batch)  # returns Python lists: the GPU work is complete
            seconds.append(time.perf_counter() - begin)
        median = statistics.median(seconds)
        rows.append(
            {
                "batch_size": batch_size,
                "images_per_second": round(batch_size / median, 1),
                "batch_latency_ms": round(median * 1000, 2),
                "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                if cuda
                else None,
            }
        )
    result = {
        "model": f"{model.name} {model.version}",
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": getattr(model, "precision", args.precision),
        "graph": getattr(model, "graph", args.graph),  # eager if the script graph failed its check
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_seconds": round(load_seconds, 2),
        "top_labels": labels,
        "labels_sensible": sensible,
        "batches": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{result['model']} on {result['device']}, {result['precision']}, {result['graph']} graph, "
        f"loaded in {result['load_seconds']} s; labels sensible: {sensible} {labels}"
    )
    print(f"{'batch':>5} {'images/s':>10} {'ms/batch':>10} {'peak GPU MB':>12}")
    for row in rows:
        print(
            f"{row['batch_size']:>5} {row['images_per_second']:>10} {row['batch_latency_ms']:>10} "
            f"{row['peak_gpu_memory_mb'] if row['peak_gpu_memory_mb'] is not None else '-':>12}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
