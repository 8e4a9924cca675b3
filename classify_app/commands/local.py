"""Commands that run here, without a broker or a worker: classify-image, train-head, bench."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
from faust.cli import AppCommand, argument, option

from agents.downloader import ImageDownloader
from classify_app.application import app
from classify_app.commands import fail
from classify_app.settings import SettingsError
from classify_app.worker import create_model_from, create_tasks_from
from models import ImagePreparer, ImageRejected
from models.base import ImageContext
from models.heads import HeadError, LinearHead, Report
from models.tasks import TaskError, TaskSet
from models.training import TrainingError
from models.training import train_head as train


@app.command(
    argument("path_or_url"),
    option("--top-k", type=int, default=5, show_default=True, help="Labels shown."),
    option("--head", default=None, help="A head file from train-head (default: CLASSIFY_HEAD)."),
    option("--tasks", default=None, help="Tasks to run, e.g. category,moderation."),
)
async def classify_image(
    self: AppCommand, path_or_url: str, top_k: int, head: str | None, tasks: str | None
) -> None:
    """Classify one image with the configured model and tasks, here, without broker or worker.

    PATH_OR_URL is a local file or an http(s) URL (downloaded with the worker's limits).
    """
    settings = dataclasses.replace(
        app.settings,
        head=app.settings.head if head is None else head,
        tasks=app.settings.tasks if tasks is None else tasks,
    )
    try:
        settings.validate()
        model = create_tasks_from(settings)
    except (SettingsError, HeadError, TaskError) as exc:
        fail(self, str(exc))
    downloader = ImageDownloader(settings)
    try:
        if path_or_url.startswith(("http://", "https://")):
            data = await downloader.fetch(path_or_url)
        else:
            data = Path(path_or_url).read_bytes()
        await asyncio.get_running_loop().run_in_executor(None, model.load)
        preparer = ImagePreparer(model, threads=1, max_pixels=settings.max_image_pixels)
        inputs = await preparer.prepare(data)
    except ImageRejected as exc:
        fail(self, f"{exc.reason}: {exc.message}")
    finally:
        await downloader.close()
    stacked = {name: np.stack([value]) for name, value in inputs.items()}
    [prediction] = model.predict_batch(stacked, [ImageContext()])
    self.say(
        f"{path_or_url}: category {prediction.category} "
        f"({model.name} {model.version} on {model.device})"
    )
    for label in prediction.labels[:top_k]:
        self.say(f"  {label.score:6.1%}  {label.name}")
    for name, output in prediction.outputs.items():
        values = {k: v for k, v in output.as_record().items() if k not in ("task", "vector")}
        self.say(f"  {name}: {values}")


@app.command(
    option("--images", "folder", required=True, help="DIR/<category>/<photo> (JPEG, PNG, WebP)."),
    option("--out", required=True, help="The head file to write (safetensors)."),
    option("--holdout", type=float, default=0.2, show_default=True, help="Share held out."),
    option("--augment", type=int, default=0, show_default=True, help="Variants per photo."),
    option("--epochs", type=int, default=300, show_default=True, help="L-BFGS iterations."),
    option("--seed", type=int, default=0, show_default=True, help="Split and augmentation."),
)
async def train_head(
    self: AppCommand,
    folder: str,
    out: str,
    holdout: float,
    augment: int,
    epochs: int,
    seed: int,
) -> None:
    """Train the marketplace's own categories: a linear head on the backbone's embedding.

    Prints a report on the held-out photos; `CLASSIFY_HEAD=OUT` makes a worker use the head.
    """
    settings = app.settings
    backbone = create_model_from(settings)
    preparer = ImagePreparer(TaskSet(backbone, []), threads=1, max_pixels=settings.max_image_pixels)

    def progress(stage: str, done: int, total: int) -> None:
        bar = "#" * (30 * done // max(total, 1))
        print(f"\r{stage:26} [{bar:30}] {done}/{total}", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    def run() -> tuple[LinearHead, Report]:
        backbone.load()
        return train(
            Path(folder),
            backbone,
            preparer,
            holdout=holdout,
            augment=augment,
            seed=seed,
            epochs=epochs,
            progress=progress,
        )

    try:
        head, report = await asyncio.get_running_loop().run_in_executor(None, run)
    except (TrainingError, ImageRejected) as exc:
        fail(self, str(exc))
    head.save(Path(out))
    self.say(report.text())
    self.say(f"wrote {out}: {len(head.categories)} categories, {head.version}, for {head.backbone}")


@app.command(argument("which"), argument("args", nargs=-1, type=str))
async def bench(self: AppCommand, which: str, args: tuple[str, ...]) -> None:
    """Run a benchmark of the source tree's bench/ (model, pipeline, store, soak, heads...).

    WHICH names it; the arguments after `--` go to it (see `python bench/WHICH.py --help`).
    """
    script = Path(__file__).resolve().parents[2] / "bench" / f"{which}.py"
    if not script.exists():
        fail(self, f"no benchmark {which!r} at {script} (bench/ is in the source tree)")
    completed = subprocess.run([sys.executable, str(script), *args], check=False)
    if completed.returncode:
        fail(self, f"{which} exited with status {completed.returncode}")
