"""Decode and resize: the worker's Pillow path against libjpeg-turbo bindings and resize options.

    python bench/decode.py [--rounds 100] [--pool-images 600] [--out FILE]
    PYTHONPATH=DIR python bench/decode.py     # DIR holding pillow-simd, to compare its resize

The photos: the sample photos as the benchmarks serve them (JPEG, quality 90, 451 x 300 to
741 x 500), and the same photos scaled up to 1600 x 1200 and 4000 x 3000 (what marketplace
photos often are). Each way of turning the JPEG bytes into the model's 224 x 224 input is timed
in this one thread (CPU time per image, median of `--rounds` passes over the photos):

  * `pillow`: the worker's (`models.preprocess`): header check, `draft` (DCT scaling by 1/2,
    1/4 or 1/8 while the short side stays at least 256), decode, bicubic resize of the kept
    region only (`box`);
  * `pillow, no draft`: the same decoding every pixel;
  * `pillow, reducing_gap 2`: the worker's with Pillow's `reducing_gap` (a box reduction by
    an integer factor before the bicubic pass);
  * `simplejpeg`: libjpeg-turbo's own scaling (any n/8 factor) to a short side of at least
    256, then the same resize;
  * `pyturbojpeg`: the same through PyTurboJPEG (needs libturbojpeg, version 3 for
    PyTurboJPEG 2; `TURBOJPEG_LIB` names it).

Also the largest pixel difference of each way's output from the worker's (0-255).

Then the worker's path in a pool of 2 threads (what the worker runs) against 2 processes
(forkserver), the photos as served and at 1600 x 1200, `--pool-images` of them submitted at
once from an event loop as the worker does: images a second, and CPU per image in this
process (the event loop and, with processes, sending the bytes out and the pixels back) and
in all processes. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from classify_app.dev.images import SAMPLE_PHOTOS, sample_photo_jpeg
from models.preprocess import decode_image, resize_center_crop, short_side_draft

RESIZE, CROP = 256, 224
SIZES = {"served": None, "1600x1200": (1600, 1200), "4000x3000": (4000, 3000)}
MAX_PIXELS = 10**8


def photos(size: tuple[int, int] | None) -> list[bytes]:
    """The sample photos as served, or scaled up to `size` (landscape) and saved as JPEG 90."""
    found = []
    for name in SAMPLE_PHOTOS:
        data = sample_photo_jpeg(name)
        if size is not None:
            with Image.open(io.BytesIO(data)) as image:
                buffer = io.BytesIO()
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                    buffer, "JPEG", quality=90
                )
                data = buffer.getvalue()
        found.append(data)
    return found


def worker_path(data: bytes) -> np.ndarray:
    image = decode_image(data, max_pixels=MAX_PIXELS, draft=short_side_draft(RESIZE))
    return resize_center_crop(image, resize=RESIZE, crop=CROP)


def no_draft(data: bytes) -> np.ndarray:
    return resize_center_crop(decode_image(data, max_pixels=MAX_PIXELS), resize=RESIZE, crop=CROP)


def reducing_gap(data: bytes) -> np.ndarray:
    image = decode_image(data, max_pixels=MAX_PIXELS, draft=short_side_draft(RESIZE))
    return resize_center_crop(image, resize=RESIZE, crop=CROP, reducing_gap=2.0)


def simplejpeg_path() -> Callable[[bytes], np.ndarray] | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        landscape = width >= height
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=RESIZE if landscape else 0,
            min_width=0 if landscape else RESIZE,
        )
        return resize_center_crop(Image.fromarray(pixels), resize=RESIZE, crop=CROP)

    return decode


def pyturbojpeg_path() -> Callable[[bytes], np.ndarray] | None:
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
    except ImportError:
        return None
    try:
        turbo = TurboJPEG(os.environ.get("TURBOJPEG_LIB") or None)
    except Exception as exc:  # no libturbojpeg, or one too old for this binding
        print(f"pyturbojpeg left out: {str(exc).splitlines()[0]}")
        return None

    def decode(data: bytes) -> np.ndarray:
        width, height, _, _ = turbo.decode_header(data)
        short = min(width, height)
        # The smallest of libjpeg-turbo's n/8 factors keeping the short side >= RESIZE.
        factor = next(
            (f for f in sorted(turbo.scaling_factors, key=lambda f: f[0] / f[1])
             if short * f[0] / f[1] >= RESIZE),
            (1, 1),
        )  # fmt: skip
        pixels = turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor)
        return resize_center_crop(Image.fromarray(pixels), resize=RESIZE, crop=CROP)

    return decode


def measure(decode: Callable[[bytes], np.ndarray], data: list[bytes], rounds: int) -> float:
    """Median CPU milliseconds per image over `rounds` passes."""
    for photo in data:
        decode(photo)
    passes = []
    for _ in range(rounds):
        started = time.thread_time()
        for photo in data:
            decode(photo)
        passes.append((time.thread_time() - started) / len(data))
    return statistics.median(passes) * 1000


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def through_pool(kind: str, data: list[bytes], count: int, workers: int = 2) -> dict[str, float]:
    """`count` photos through the worker's path in `workers` threads or processes, submitted
    at once from an event loop: images a second, and CPU ms per image here and in all."""
    executor: Executor
    if kind == "threads":
        executor = ThreadPoolExecutor(workers)
    else:
        context = multiprocessing.get_context("forkserver")
        executor = ProcessPoolExecutor(workers, mp_context=context)

    def children() -> float:
        # The pool's processes by pid (none for threads): ProcessPoolExecutor has no public
        # way to them.
        processes = getattr(executor, "_processes", None) or {}
        return sum(cpu_seconds(pid) for pid in processes)

    async def run() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        # Started and warm first: a process pool's start-up is not what is compared.
        await asyncio.gather(*(loop.run_in_executor(executor, worker_path, p) for p in data))
        own, theirs, wall = time.process_time(), children(), time.perf_counter()
        await asyncio.gather(
            *(
                loop.run_in_executor(executor, worker_path, data[n % len(data)])
                for n in range(count)
            )
        )
        return (
            time.perf_counter() - wall,
            time.process_time() - own,
            children() - theirs,
        )

    try:
        wall, own, theirs = asyncio.run(run())
    finally:
        executor.shutdown(wait=True)
    return {
        "images_per_second": round(count / wall, 1),
        "cpu_ms_per_image_here": round(own / count * 1000, 3),
        "cpu_ms_per_image_all": round((own + theirs) / count * 1000, 3),
    }


def pools(count: int) -> dict[str, dict[str, dict[str, float]]]:
    """Threads against processes, per photo size; printed as a table."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    print(f"\n{count} images at once through 2 threads or 2 processes: images/s, CPU ms per "
          "image here / in all")  # fmt: skip
    for size_name in ("served", "1600x1200"):
        data = photos(SIZES[size_name])
        row = found[size_name] = {kind: through_pool(kind, data, count) for kind in
                                  ("threads", "processes")}  # fmt: skip
        cells = [
            f"{kind}: {cell['images_per_second']:.1f}/s, {cell['cpu_ms_per_image_here']:.2f} / "
            f"{cell['cpu_ms_per_image_all']:.2f} ms"
            for kind, cell in row.items()
        ]
        print(f"{size_name:12}" + "    ".join(cells))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--pool-images", type=int, default=600, help="0: no pools")
    parser.add_argument("--out", default="bench-results/decode.json")
    args = parser.parse_args()
    ways: dict[str, Callable[[bytes], np.ndarray] | None] = {
        "pillow": worker_path,
        "pillow, no draft": no_draft,
        "pillow, reducing_gap 2": reducing_gap,
        "simplejpeg": simplejpeg_path(),
        "pyturbojpeg": pyturbojpeg_path(),
    }
    results: dict[str, Any] = {"pillow_version": PIL.__version__, "sizes": {}}
    print(f"Pillow {PIL.__version__}; CPU ms per image, one thread (max pixel difference)")
    print(f"{'':24}" + "".join(f"{size:>20}" for size in SIZES))
    rows: dict[str, dict[str, Any]] = {}
    for size_name, size in SIZES.items():
        data = photos(size)
        reference = [worker_path(photo) for photo in data]
        rounds = max(5, args.rounds // (1 if size is None else 10))
        for way, decode in ways.items():
            if decode is None:
                rows.setdefault(way, {})[size_name] = None
                continue
            difference = max(
                int(np.abs(decode(p).astype(np.int16) - r.astype(np.int16)).max())
                for p, r in zip(data, reference, strict=True)
            )
            rows.setdefault(way, {})[size_name] = {
                "cpu_ms_per_image": round(measure(decode, data, rounds), 3),
                "max_pixel_difference": difference,
            }
    for way, by_size in rows.items():
        cells = [
            "not installed" if cell is None
            else f"{cell['cpu_ms_per_image']:.2f} ({cell['max_pixel_difference']})"
            for cell in by_size.values()
        ]  # fmt: skip
        print(f"{way:24}" + "".join(f"{cell:>20}" for cell in cells))
    results["ways"] = rows
    if args.pool_images:
        results["pools"] = pools(args.pool_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
