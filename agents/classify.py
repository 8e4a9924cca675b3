"""Stage 2: image tasks -> image outcomes. Batched inference.

Tasks are taken in batches of up to `batch_max_size`, waiting at most `batch_max_wait_ms` for a
batch to fill; while a batch runs in the inference thread the next one gathers, so under load
batches grow by themselves. Offsets are committed only after a batch's outcomes are sent.
"""

from __future__ import annotations

import base64
import gc
import logging
import time
from typing import Any

import numpy as np

from classify_app.application import app, metrics, runtime, settings
from classify_app.records import ImageError, ImageOutcome, ImageTask, Label
from classify_app.topics import image_outcomes_topic, image_tasks_topic
from models import Prediction

log = logging.getLogger(__name__)


class InferenceQueue:
    """What this worker holds for inference: for the `images waiting` gauge."""

    def __init__(self) -> None:
        self.stream: Any = None  # the stage's stream, once its agent runs
        self.in_batch = 0

    def waiting(self) -> int:
        """Image tasks buffered by the stage's stream plus those in the running batch."""
        buffered = 0 if self.stream is None else self.stream.channel.queue.qsize()
        return self.in_batch + buffered


inference_queue = InferenceQueue()


@app.agent(image_tasks_topic)
async def classify_images(stream: Any) -> None:
    """Load the model, then classify image tasks batch by batch."""
    await runtime.start()
    if settings.gc_freeze:
        # Everything alive now (the model, torch, Faust) lives as long as the worker: full
        # collections need not walk it again and again.
        gc.collect()
        gc.freeze()
        log.info("Froze %d long-lived objects out of the garbage collector", gc.get_freeze_count())
    model = runtime.model
    metrics.model.info(
        {
            "name": model.name,
            "version": model.version,
            "device": model.device,
            "device_name": runtime.device_name(),
        }
    )
    inference_queue.stream = stream
    async for events in stream.take_events(
        settings.batch_max_size, within=settings.batch_max_wait_ms / 1000
    ):
        started = time.time()
        inference_queue.in_batch = len(events)
        tasks: list[ImageTask] = [event.value for event in events]
        queue_seconds = [max(0.0, started - event.message.timestamp) for event in events]
        for outcome in await classify_batch(tasks, queue_seconds):
            await image_outcomes_topic.send(key=outcome.ad.ad_id, value=outcome)
        inference_queue.in_batch = 0


async def classify_batch(tasks: list[ImageTask], queue_seconds: list[float]) -> list[ImageOutcome]:
    """Run the model over the tasks that fit it; every task gets exactly one outcome."""
    size = runtime.model.input_size
    outcomes: dict[int, ImageOutcome] = {}
    runnable: list[int] = []
    arrays: list[np.ndarray] = []
    for position, task in enumerate(tasks):
        if (task.height, task.width) != (size, size):
            outcomes[position] = _failure(
                task,
                "model_input_mismatch",
                f"the task holds {task.height}x{task.width} pixels; {runtime.model.name} "
                f"takes {size}x{size}",
            )
            continue
        pixels = np.frombuffer(base64.b64decode(task.pixels), dtype=np.uint8)
        arrays.append(pixels.reshape(size, size, 3))
        runnable.append(position)
    if arrays:
        started = time.perf_counter()
        try:
            predictions = await runtime.predict(np.stack(arrays))
        except Exception as exc:
            log.exception("Inference failed for a batch of %d images", len(arrays))
            for position in runnable:
                outcomes[position] = _failure(tasks[position], "inference_error", repr(exc))
        else:
            inference_seconds = time.perf_counter() - started
            metrics.batch_classified(
                len(arrays), inference_seconds, [queue_seconds[p] for p in runnable]
            )
            for position, prediction in zip(runnable, predictions, strict=True):
                outcomes[position] = _success(
                    tasks[position],
                    prediction,
                    {
                        "queue_seconds": round(queue_seconds[position], 6),
                        "inference_seconds": round(inference_seconds, 6),
                        "batch_size": len(arrays),
                    },
                )
    return [outcomes[position] for position in range(len(tasks))]


def _success(task: ImageTask, prediction: Prediction, timings: dict[str, float]) -> ImageOutcome:
    return ImageOutcome(
        ad=task.ad,
        index=task.index,
        url=task.url,
        labels=[Label(name=label.name, score=label.score) for label in prediction.labels],
        category=prediction.category,
        category_scores=prediction.category_scores,
        model=runtime.model.name,
        model_version=runtime.model.version,
        timings={**_stage_timings(task), **timings},
    )


def _failure(task: ImageTask, reason: str, message: str) -> ImageOutcome:
    return ImageOutcome(
        ad=task.ad,
        index=task.index,
        url=task.url,
        error=ImageError(reason=reason, message=message),
        model=runtime.model.name,
        model_version=runtime.model.version,
        timings=_stage_timings(task),
    )


def _stage_timings(task: ImageTask) -> dict[str, float]:
    return {
        "download_seconds": task.download_seconds,
        "preprocess_seconds": task.preprocess_seconds,
    }
