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
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from classify_app.vocabulary import ImageReason
from models.base import ImageContext, Prediction
from models.preprocess import ImageRejected
from models.runtime import ModelRuntime

log = logging.getLogger(__name__)

# Called once per batch with its size, the model's seconds and each image's queue wait.
BatchObserver = Callable[[int, float, list[float]], None]


class ModelUnavailable(Exception):
    """The model could not be loaded: not the image's fault."""


class InferenceFailed(Exception):
    """The model raised on the image again and again, alone or among images it takes: the
    image's own fault."""


class DeviceFailed(ModelUnavailable):
    """The model raised on the image's batch, or took too long: most likely its device (out of
    memory, a broken context), so the image is to be tried again."""


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
    inputs: dict[str, np.ndarray]
    context: ImageContext
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
        timeout_s: float = 60.0,
        max_consecutive_failures: int = 3,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.on_batch = on_batch
        self._consecutive_failures = 0
        self._batches_done = 0
        # Each image (by its pixels) in a failed batch: how often, and how many batches had
        # run then; bounded.
        self._failures: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._waiting: deque[_Request] = deque()
        self._running: dict[asyncio.Task[None], int] = {}  # batch task -> its size
        self._wake: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None

    def waiting(self) -> int:
        """Images queued plus those in running batches (the `images waiting` gauge)."""
        return len(self._waiting) + sum(self._running.values())

    async def predict(
        self, inputs: dict[str, np.ndarray], context: ImageContext | None = None
    ) -> BatchedPrediction:
        """Queue one image's prepared inputs (`TaskSet.preprocess`: each uint8, of the shape
        `input_shapes` says) and return its prediction once its batch ran.

        Raises `ImageRejected` (`model_input_mismatch`) for a shape the model does not take,
        `DeviceFailed` (a `ModelUnavailable`) if the model raised on the batch or hung,
        `InferenceFailed` if it raised on this image in two batches, `ModelUnavailable` if it
        cannot load and `BatcherStopping` if the worker stops first.
        """
        for name, shape in self.runtime.model.input_shapes.items():
            given = inputs[name].shape if name in inputs else ()
            if given != shape:
                raise ImageRejected(
                    ImageReason.MODEL_INPUT_MISMATCH,
                    f"the image's {name} hold {'x'.join(map(str, given)) or 'nothing'}; "
                    f"{self.runtime.model.name} takes {'x'.join(map(str, shape))}",
                )
        loop = asyncio.get_running_loop()
        request = _Request(inputs, context or ImageContext(), loop.create_future())
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
            # Not `wait_for`: on Python 3.11 it swallows a cancellation that comes as its
            # future completes, and the runner would outlive its stop.
            async with asyncio.timeout(seconds):
                await self._wake
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
        if self.runtime.broken is not None:
            _settle(batch, ModelUnavailable(self.runtime.broken))
            return
        queue_seconds = [max(0.0, started - request.queued_at) for request in batch]
        try:
            stacked = {
                name: np.stack([request.inputs[name] for request in batch])
                for name in self.runtime.model.input_shapes
            }
            async with asyncio.timeout(self.timeout_s):
                predictions, seconds = await self.runtime.predict(
                    stacked, [request.context for request in batch]
                )
        except asyncio.CancelledError:
            _settle(batch, asyncio.CancelledError())
            raise
        except TimeoutError:
            # The thread cannot be taken back: the model is stuck for good.
            why = f"a batch of {len(batch)} images ran longer than {self.timeout_s:g} s"
            self.runtime.mark_broken(why)
            _settle(batch, DeviceFailed(why))
            return
        except Exception as exc:
            log.exception("Inference failed for a batch of %d images", len(batch))
            self._batch_failed(batch, exc)
            return
        self._consecutive_failures = 0
        self._batches_done += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds, queue_seconds)
        for request, prediction, waited in zip(batch, predictions, queue_seconds, strict=True):
            if not request.done.done():
                request.done.set_result(
                    BatchedPrediction(prediction, round(waited, 6), round(seconds, 6), len(batch))
                )

    def _batch_failed(self, batch: list[_Request], exc: Exception) -> None:
        """Most failures are the device's (out of memory, a lost context): each image is left
        for another try, and after `max_consecutive_failures` failed batches in a row the model
        is marked broken. An image that was in a failed batch before, while batches without
        it ran, fails on its own: its own fault."""
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.max_consecutive_failures:
            self.runtime.mark_broken(
                f"{self._consecutive_failures} batches failed in a row: {exc!r}"
            )
        for request in batch:
            digest = hashlib.blake2b(
                b"".join(array.tobytes() for array in request.inputs.values()), digest_size=16
            ).digest()
            seen, done_then = self._failures.pop(digest, (0, self._batches_done))
            seen += 1
            self._failures[digest] = (seen, self._batches_done)
            while len(self._failures) > 1024:
                self._failures.popitem(last=False)
            others_ran = self._batches_done > done_then
            if seen >= 2 and others_ran and self.runtime.broken is None:
                _settle([request], InferenceFailed(f"failed in {seen} batches: {exc!r}"))
            else:
                _settle([request], DeviceFailed(repr(exc)))


def _settle(requests: Iterable[_Request], error: BaseException) -> None:
    """Fail (or cancel) the requests' futures that are still open."""
    for request in requests:
        if request.done.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            request.done.cancel()
        else:
            request.done.set_exception(error)
