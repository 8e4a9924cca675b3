"""Commands that run here, without a broker or a worker: classify-image, bench."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
from faust.cli import AppCommand, argument, option

from agents.downloader import ImageDownloader
from classify_app.application import app
from classify_app.commands import fail
from classify_app.worker import create_model_from
from models import ImagePreparer, ImageRejected


@app.command(
    argument("path_or_url"),
    option("--top-k", type=int, default=5, show_default=True, help="Labels shown."),
)
async def classify_image(self: AppCommand, path_or_url: str, top_k: int) -> None:
    """Classify one image with the configured model, here, without broker or worker.

    PATH_OR_URL is a local file or an http(s) URL (downloaded with the worker's limits).
    """
    settings = app.settings
    model = create_model_from(settings)
    downloader = ImageDownloader(settings)
    try:
        if path_or_url.startswith(("http://", "https://")):
            data = await downloader.fetch(path_or_url)
        else:
            data = Path(path_or_url).read_bytes()
        await asyncio.get_running_loop().run_in_executor(None, model.load)
        preparer = ImagePreparer(model, threads=1, max_pixels=settings.max_image_pixels)
        pixels = await preparer.prepare(data)
    except ImageRejected as exc:
        fail(self, f"{exc.reason}: {exc.message}")
    finally:
        await downloader.close()
    [prediction] = model.predict_batch(np.stack([pixels]))
    self.say(f"{path_or_url}: category {prediction.category} ({model.name} on {model.device})")
    for label in prediction.labels[:top_k]:
        self.say(f"  {label.score:6.1%}  {label.name}")


@app.command(argument("which"), argument("args", nargs=-1, type=str))
async def bench(self: AppCommand, which: str, args: tuple[str, ...]) -> None:
    """Run a benchmark of the source tree's bench/ (model, pipeline, store or soak).

    WHICH names it; the arguments after `--` go to it (see `python bench/WHICH.py --help`).
    """
    script = Path(__file__).resolve().parents[2] / "bench" / f"{which}.py"
    if not script.exists():
        fail(self, f"no benchmark {which!r} at {script} (bench/ is in the source tree)")
    completed = subprocess.run([sys.executable, str(script), *args], check=False)
    if completed.returncode:
        fail(self, f"{which} exited with status {completed.returncode}")
