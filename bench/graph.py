"""The model graph: TorchScript (what the worker runs) against eager PyTorch, ONNX Runtime and
AOTInductor, on the CPU, with what each costs at start-up.

    python bench/graph.py [--threads 2] [--batch 8] [--rounds 30] [--aoti] [--out FILE]

Each runs the same EfficientNet-Lite0 network with the packaged weights (built by
`models.efficientnet`, in eager mode, then turned into each graph) on the same normalised
batch, in a process with the worker's allocator settings: start-up (building the graph from
the eager network: tracing and freezing, an ONNX export and session, or an AOTInductor compile
and load), images/s (median of `--rounds` batches after warm-up), and the largest difference
of its logits from eager's. TorchScript is deprecated upstream; AOTInductor (`torch.export` +
`aoti_compile_and_package`) compiles C++ and takes minutes here, hence `--aoti`. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classify_app.dev.processes import MALLOC_TUNABLES
from models import create_model
from models.efficientnet import _scripted


def eager_network(threads: int) -> torch.nn.Module:
    torch.set_num_threads(threads)
    model: Any = create_model("efficientnet-lite0", device="cpu", precision="fp32", graph="eager")
    model.load()
    return model._network  # the eager module the worker would script


def timed(run: Callable[[], Any], rounds: int) -> float:
    for _ in range(3):
        run()
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    if os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
        # The worker's allocator settings, without which torch page-faults on every batch
        # (ONNX Runtime, with its own arena, would look 2-3x faster than it is).
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES},
        )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--aoti", action="store_true")
    parser.add_argument("--out", default="bench-results/graph.json")
    args = parser.parse_args()

    network = eager_network(args.threads)
    batch = torch.from_numpy(
        np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, 224, 224)).astype(np.float32)
    ).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = network(batch)[1].numpy()
    graphs: dict[str, Callable[[], Callable[[], np.ndarray]]] = {}

    def eager() -> Callable[[], np.ndarray]:
        return lambda: network(batch)[1].numpy()

    def script() -> Callable[[], np.ndarray]:
        scripted = _scripted(network, batch[:1])  # traced, frozen, optimised: the worker's
        return lambda: scripted(batch)[1].numpy()

    def onnxruntime() -> Callable[[], np.ndarray]:
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "lite0.onnx"
        torch.onnx.export(
            network, (batch,), str(path), input_names=["pixels"],
            output_names=["pooled", "logits"], dynamic_axes={"pixels": {0: "batch"}},
            dynamo=False,
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        pixels = batch.contiguous().numpy()
        return lambda: session.run(["logits"], {"pixels": pixels})[0]

    def aoti() -> Callable[[], np.ndarray]:
        exported = torch.export.export(network, (batch,))
        package = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(Path(tempfile.mkdtemp()) / "lite0.pt2")
        )
        compiled = torch._inductor.aoti_load_package(package)
        return lambda: compiled(batch)[1].numpy()

    graphs = {"eager": eager, "torchscript (the worker's)": script, "onnxruntime": onnxruntime}
    if args.aoti:
        graphs["aotinductor"] = aoti
    rows = []
    with torch.inference_mode():
        for name, build in graphs.items():
            started = time.perf_counter()
            run = build()
            logits = run()  # the first call is part of the start-up
            startup = time.perf_counter() - started
            seconds = timed(run, args.rounds)
            rows.append(
                {
                    "graph": name,
                    "startup_seconds": round(startup, 2),
                    "images_per_second": round(args.batch / seconds, 1),
                    "max_logit_difference": float(np.abs(logits - reference).max()),
                }
            )
            row = rows[-1]
            print(
                f"{name:28} start-up {row['startup_seconds']:6.2f} s  "
                f"{row['images_per_second']:7.1f} images/s (batch {args.batch}, "
                f"{args.threads} threads)  max logit difference {row['max_logit_difference']:.2e}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "graphs": rows}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
