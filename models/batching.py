"""Adaptive batching: many callers, one prediction each, computed in batches.

Each caller hands one preprocessed image to `InferenceBatcher.predict` and awaits its own
prediction (a future per image, as MLServer's adaptive batcher does). Images are taken in
batches of up to `max_size`, waiting at most `max_wait_s` after the oldest one for a batch to
fill; while a batch runs in an inference thread the next one gathers, so under load batches
grow by themselves. Up to `runtime.streams` batches run at once. The batcher knows only the
model runtime: what the caller does with its prediction is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from classify_app.vocabulary import ImageReason
from models.base import Prediction
from models.preprocess import ImageRejected
from models.runtime import ModelRuntime

log = logging.getLogger(__name__)

# Called once per batch with its size, the model's seconds and each image's queue wait.
BatchObserver = Callable[[int, float, list[float]], None]


class ModelUnavailable(Exception):
    """The model could not be loaded: not the image's fault."""


class InferenceFailed(Exception):
    """The model raised on the image's batch."""


class BatcherStopping(Exception):
    """The worker stops before the image's batch started."""


@dataclass(frozen=True)
class BatchedPrediction:
    """One image's prediction and how it was computed."""

    prediction: Prediction
    queue_seconds: float
    inference_seconds: float
    batch_size: int


@dataclass
class _Request:
    pixels: np.ndarray
    done: asyncio.Future[BatchedPrediction]
    queued_at: float = field(default_factory=time.monotonic)


class InferenceBatcher:
    """Images waiting for the model, predicted in batches by one runner task.

    The runner starts with the first image and ends when none is left, in the event loop of
    whoever submits. At shutdown `abandon_waiting` gives up the images whose batch has not
    started; running batches finish and their callers get their predictions.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_size: int,
        max_wait_s: float,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._waiting: deque[_Request] = deque()
        self._running: dict[asyncio.Task[None], int] = {}  # batch task -> its size
        self._wake: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None

    def waiting(self) -> int:
        """Images queued plus those in running batches (the `images waiting` gauge)."""
        return len(self._waiting) + sum(self._running.values())

    async def predict(self, pixels: np.ndarray) -> BatchedPrediction:
        """Queue one image (H x W x 3, uint8) and return its prediction once its batch ran.

        Raises `ImageRejected` (`model_input_mismatch`) for a shape the model does not take,
        `InferenceFailed` if the model raised on the batch, `ModelUnavailable` if it cannot
        load and `BatcherStopping` if the worker stops first.
        """
        size = self.runtime.model.input_size
        if pixels.shape != (size, size, 3):
            raise ImageRejected(
                ImageReason.MODEL_INPUT_MISMATCH,
                f"the image holds {'x'.join(map(str, pixels.shape))} values; "
                f"{self.runtime.model.name} takes {size}x{size}x3",
            )
        loop = asyncio.get_running_loop()
        request = _Request(pixels, loop.create_future())
        self._waiting.append(request)
        self._wake_runner()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await request.done

    def abandon_waiting(self) -> None:
        """At shutdown: images whose batch has not started get `BatcherStopping`."""
        _settle(self._waiting, BatcherStopping("the worker is stopping"))
        self._waiting.clear()
        self._wake_runner()

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
                if len(self._running) >= self.runtime.streams:
                    await self._sleep(None)
                    continue
                batch = await self._gather()
                if not batch:
                    continue  # given up while it gathered
                task = asyncio.ensure_future(self._predict(batch))
                self._running[task] = len(batch)
                task.add_done_callback(self._batch_done)
        except asyncio.CancelledError:
            # The event loop is going away: whoever waits is cancelled too.
            for task in self._running:
                task.cancel()
            _settle(self._waiting, asyncio.CancelledError())
            self._waiting.clear()
            raise

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake_runner()

    async def _gather(self) -> list[_Request]:
        """The next batch: up to `max_size` images, waiting at most `max_wait_s` after the
        oldest one was queued for the batch to fill."""
        deadline = self._waiting[0].queued_at + self.max_wait_s
        while (
            self._waiting
            and len(self._waiting) < self.max_size
            and (left := deadline - time.monotonic()) > 0
        ):
            await self._sleep(left)
        count = min(self.max_size, len(self._waiting))
        return [self._waiting.popleft() for _ in range(count)]

    async def _predict(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        try:
            await self.runtime.start()
        except Exception as exc:
            _settle(batch, ModelUnavailable(self.runtime.error or repr(exc)))
            return
        queue_seconds = [max(0.0, started - request.queued_at) for request in batch]
        try:
            predictions, seconds = await self.runtime.predict(
                np.stack([request.pixels for request in batch])
            )
        except asyncio.CancelledError:
            _settle(batch, asyncio.CancelledError())
            raise
        except Exception as exc:
            log.exception("Inference failed for a batch of %d images", len(batch))
            _settle(batch, InferenceFailed(repr(exc)))
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds, queue_seconds)
        for request, prediction, waited in zip(batch, predictions, queue_seconds, strict=True):
            if not request.done.done():
                request.done.set_result(
                    BatchedPrediction(prediction, round(waited, 6), round(seconds, 6), len(batch))
                )


def _settle(requests: Iterable[_Request], error: BaseException) -> None:
    """Fail (or cancel) the requests' futures that are still open."""
    for request in requests:
        if request.done.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            request.done.cancel()
        else:
            request.done.set_exception(error)
