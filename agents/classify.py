"""Stage 2: prepared images -> image outcomes. Batched inference, in memory.

The download stage hands each prepared image (its model-ready pixels) to `batcher` and waits
until the image's outcome is sent to image-outcomes; the ad's event is acknowledged only after
every image of the ad has its outcome, so a crash replays the ad and loses nothing. Pixels never
travel through Kafka: a 224x224 image is 150 KB, its ad event a few hundred bytes.

Images are taken in batches of up to `batch_max_size`, waiting at most `batch_max_wait_ms` for a
batch to fill; while a batch runs in the inference thread the next one gathers, so under load
batches grow by themselves. What is held here is bounded by the download stage: at most
`download_concurrency` ads are in flight, each with at most `max_images_per_ad` images.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import mode
import numpy as np

from agents.acks import LeaveUnacknowledged
from classify_app.application import app, metrics, runtime, settings
from classify_app.records import AdRef, ImageError, ImageOutcome, Label
from classify_app.topics import image_outcomes_topic
from models import Prediction

log = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """One downloaded image, preprocessed for the model, waiting for inference."""

    ad: AdRef
    index: int
    url: str
    pixels: np.ndarray  # H x W x 3, uint8
    download_seconds: float
    preprocess_seconds: float
    queued_at: float = field(default_factory=time.time)  # for the reported queue time
    queued: float = field(default_factory=time.monotonic)  # for the batch deadline


Waiting = tuple[PreparedImage, asyncio.Future[None]]


class ModelUnavailable(LeaveUnacknowledged):
    """The model could not be loaded. Not the image's fault, so not an image outcome: its ad
    is left unacknowledged (and the worker exits, see `ModelLoader`)."""


class OutcomeNotSent(LeaveUnacknowledged):
    """The image was classified but its outcome could not be produced: its ad is left
    unacknowledged, to be processed again, rather than recorded as failed."""


class WorkerStopping(LeaveUnacknowledged):
    """The worker stops before the image's batch started: its ad is processed again later."""


class InferenceBatcher:
    """Images waiting for the model, classified in batches by one runner task.

    The runner starts with the first image and ends when none is left, so it runs in whichever
    event loop submits, and it outlives the stages that feed it: at shutdown the download stage
    drains its in-flight ads, and their images still get their outcomes. Up to `concurrency`
    batches run at once (one per inference thread of `ModelRuntime`); each batch's outcomes are
    sent as soon as it is done.
    """

    def __init__(self, max_size: int, max_wait_s: float, concurrency: int = 1) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.concurrency = concurrency
        self._waiting: deque[Waiting] = deque()
        self._running: dict[asyncio.Task[None], int] = {}  # batch task -> its size
        self._wake: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None

    def waiting(self) -> int:
        """Images queued plus those in running batches (the `images waiting` gauge)."""
        return len(self._waiting) + sum(self._running.values())

    async def classify(self, image: PreparedImage) -> None:
        """Queue `image`; returns once its outcome is sent, raises if its batch failed."""
        loop = asyncio.get_running_loop()
        if self._runner is not None and self._runner.get_loop() is not loop:
            # Left by another event loop (tests run one each): nothing of it can run here.
            self._waiting.clear()
            self._running.clear()
            self._wake = None
            self._runner = None
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((image, done))
        self._wake_runner()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        await done

    def abandon_waiting(self) -> None:
        """At shutdown: images whose batch has not started are given up (their ads are left
        unacknowledged); running batches finish and send their outcomes."""
        _settle(self._waiting, WorkerStopping("the worker is stopping"))
        self._waiting.clear()

    def _wake_runner(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _sleep(self, seconds: float | None) -> None:
        """Until an image arrives or a batch ends, or `seconds` pass."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._wake, seconds)
        except TimeoutError:
            pass
        finally:
            self._wake = None

    async def _run(self) -> None:
        try:
            while self._waiting:
                if len(self._running) >= self.concurrency:
                    await self._sleep(None)
                    continue
                batch = await self._gather()
                task = asyncio.ensure_future(self._classify(batch))
                self._running[task] = len(batch)
                task.add_done_callback(self._batch_done)
        except asyncio.CancelledError:
            # The event loop is going away: whoever waits is cancelled too (its ad is not
            # acknowledged, so it is processed again after the restart).
            for task in self._running:
                task.cancel()
            _settle(self._waiting, asyncio.CancelledError())
            self._waiting.clear()
            raise

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake_runner()

    async def _gather(self) -> list[Waiting]:
        """The next batch: up to `max_size` images, waiting at most `max_wait_s` after the
        oldest one was queued for the batch to fill."""
        deadline = self._waiting[0][0].queued + self.max_wait_s
        while len(self._waiting) < self.max_size and (left := deadline - time.monotonic()) > 0:
            await self._sleep(left)
        count = min(self.max_size, len(self._waiting))
        return [self._waiting.popleft() for _ in range(count)]

    async def _classify(self, batch: list[Waiting]) -> None:
        """Classify one batch and send its outcomes; each image is released once its own
        outcome is sent, so a failed send can never turn a sent result into a failure."""
        try:
            outcomes = await classify_batch([image for image, _ in batch])
        except asyncio.CancelledError:
            _settle(batch, asyncio.CancelledError())
            raise
        except ModelUnavailable as exc:
            _settle(batch, exc)
            return
        except Exception as exc:
            log.exception("Classifying a batch of %d images failed", len(batch))
            _settle(batch, exc)
            return
        for position, outcome in enumerate(outcomes):
            try:
                await image_outcomes_topic.send(key=outcome.ad.ad_id, value=outcome)
            except asyncio.CancelledError:
                _settle(batch[position:], asyncio.CancelledError())
                raise
            except Exception as exc:
                log.exception("Sending an image outcome failed")
                _settle(batch[position:], OutcomeNotSent(repr(exc)))
                return
            _settle(batch[position : position + 1], None)


def _settle(waiting: Iterable[Waiting], error: BaseException | None) -> None:
    """Release the images' waiters: done, cancelled, or failed with `error`."""
    for _, done in waiting:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(error)


batcher = InferenceBatcher(
    settings.batch_max_size, settings.batch_max_wait_ms / 1000, concurrency=runtime.streams
)


@app.service
class ModelLoader(mode.Service):
    """Loads the model when the worker starts, so the first ad does not wait for it.

    If the model cannot load, the error propagates and the worker exits (its pod restarts):
    a worker that cannot classify must not go on taking ads. Images already handed over get
    `ModelUnavailable`, and their ads are left unacknowledged for the next worker.
    """

    @mode.Service.task
    async def _load(self) -> None:
        await runtime.start()
        if settings.gc_freeze:
            # Everything alive now (the model, torch, Faust) lives as long as the worker: full
            # collections need not walk it again and again.
            gc.collect()
            gc.freeze()
            log.info(
                "Froze %d long-lived objects out of the garbage collector", gc.get_freeze_count()
            )
        model = runtime.model
        metrics.model.info(
            {
                "name": model.name,
                "version": model.version,
                "device": model.device,
                "device_name": runtime.device_name(),
            }
        )


async def classify_batch(images: list[PreparedImage]) -> list[ImageOutcome]:
    """Run the model over the images that fit it; every image gets exactly one outcome."""
    try:
        await runtime.start()
    except Exception as exc:
        raise ModelUnavailable(runtime.error or repr(exc)) from exc
    started = time.time()
    queue_seconds = [max(0.0, started - image.queued_at) for image in images]
    size = runtime.model.input_size
    outcomes: dict[int, ImageOutcome] = {}
    runnable: list[int] = []
    for position, image in enumerate(images):
        if image.pixels.shape != (size, size, 3):
            outcomes[position] = _failure(
                image,
                "model_input_mismatch",
                f"the image holds {'x'.join(map(str, image.pixels.shape))} values; "
                f"{runtime.model.name} takes {size}x{size}x3",
            )
        else:
            runnable.append(position)
    if runnable:
        try:
            predictions, inference_seconds = await runtime.predict(
                np.stack([images[p].pixels for p in runnable])
            )
        except Exception as exc:
            log.exception("Inference failed for a batch of %d images", len(runnable))
            for position in runnable:
                outcomes[position] = _failure(images[position], "inference_error", repr(exc))
        else:
            metrics.batch_classified(
                len(runnable), inference_seconds, [queue_seconds[p] for p in runnable]
            )
            for position, prediction in zip(runnable, predictions, strict=True):
                outcomes[position] = _success(
                    images[position],
                    prediction,
                    {
                        "queue_seconds": round(queue_seconds[position], 6),
                        "inference_seconds": round(inference_seconds, 6),
                        "batch_size": len(runnable),
                    },
                )
    return [outcomes[position] for position in range(len(images))]


def _success(
    image: PreparedImage, prediction: Prediction, timings: dict[str, float]
) -> ImageOutcome:
    return ImageOutcome(
        ad=image.ad,
        index=image.index,
        url=image.url,
        labels=[Label(name=label.name, score=label.score) for label in prediction.labels],
        category=prediction.category,
        category_scores=prediction.category_scores,
        model=runtime.model.name,
        model_version=runtime.model.version,
        timings={**_stage_timings(image), **timings},
    )


def _failure(image: PreparedImage, reason: str, message: str) -> ImageOutcome:
    return ImageOutcome(
        ad=image.ad,
        index=image.index,
        url=image.url,
        error=ImageError(reason=reason, message=message),
        model=runtime.model.name,
        model_version=runtime.model.version,
        timings=_stage_timings(image),
    )


def _stage_timings(image: PreparedImage) -> dict[str, float]:
    return {
        "download_seconds": image.download_seconds,
        "preprocess_seconds": image.preprocess_seconds,
    }
