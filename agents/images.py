"""What becomes of one image of an ad: downloaded, decoded and resized, predicted in a batch,
and turned into its `ImageOutcome` (a prediction or a reason), or into an `ImageRetry` when a
transient download failure deserves another attempt later.

`ImageProcessor` returns the record; the download stage (`agents/download.py`) sends it, so one
stage produces every outcome. Nothing here raises for the image's own faults: only for the
worker's (`LeaveUnacknowledged`: the model cannot load, the worker stops), so that the ad is
processed again instead of recorded as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from yarl import URL

from agents.acks import LeaveUnacknowledged
from agents.downloader import ImageDownloader
from classify_app.metrics import Metrics
from classify_app.records import AdRef, ImageError, ImageOutcome, ImageRetry, Label
from classify_app.vocabulary import ImageReason, is_transient
from models import ImagePreparer, ImageRejected
from models.base import ImageContext
from models.batching import (
    BatchedPrediction,
    BatcherStopping,
    InferenceBatcher,
    InferenceFailed,
    ModelUnavailable,
)
from models.tasks import Inputs, TaskSet

log = logging.getLogger(__name__)


class ImageProcessor:
    """Takes one image from its URL to its outcome, within the worker's limits.

    At most `in_flight` images are between request and decoded pixels at once (at most
    `in_flight_per_host` of one host), across every stage that uses this processor, so the
    memory held by downloaded bytes is bounded by `in_flight` x the download byte limit. A
    transient failure is retried `attempts` times in all, the n-th retry due
    `retry_delay_s` x 4^(n-1) seconds later.
    """

    def __init__(
        self,
        *,
        downloader: ImageDownloader,
        preparer: ImagePreparer,
        batcher: InferenceBatcher,
        model: TaskSet,
        metrics: Metrics,
        in_flight: int,
        in_flight_per_host: int,
        attempts: int,
        retry_delay_s: float,
    ) -> None:
        self.downloader = downloader
        self.preparer = preparer
        self.batcher = batcher
        self.model = model
        self.metrics = metrics
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self._in_flight = asyncio.Semaphore(in_flight)
        self._per_host = in_flight_per_host
        self._hosts: dict[str, list[Any]] = {}

    async def process(
        self, ad: AdRef, index: int, url: str, attempt: int = 1
    ) -> ImageOutcome | ImageRetry:
        """The image's outcome, or its next attempt; raises only `LeaveUnacknowledged`."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            # A host's slot first: images of a slow host wait without holding the slots the
            # images of every other host need.
            async with self._host_slot(url), self._in_flight:
                pixels = await self._download_and_prepare(url, started, timings)
            predicted = await self.batcher.predict(
                pixels, ImageContext(catalog_name=ad.catalog_name, title=ad.title, price=ad.price)
            )
        except ImageRejected as exc:
            if is_transient(exc.reason) and attempt < self.attempts:
                return self._retry(ad, index, url, attempt, exc)
            message = exc.message if attempt == 1 else f"{exc.message} (after {attempt} attempts)"
            return self._failure(ad, index, url, exc.reason, message, started, timings)
        except InferenceFailed as exc:
            return self._failure(
                ad, index, url, ImageReason.INFERENCE_ERROR, str(exc), started, timings
            )
        except (ModelUnavailable, BatcherStopping) as exc:
            raise LeaveUnacknowledged(str(exc)) from exc
        except Exception as exc:
            # A bug must cost one image its result, never the ad nor the worker.
            log.exception(
                "Unexpected error processing image %d of ad %s",
                index,
                ad.ad_id,
                extra={"ad_id": ad.ad_id, "stage": "download"},
            )
            return self._failure(
                ad, index, url, ImageReason.INTERNAL_ERROR, repr(exc), started, timings
            )
        return self._success(ad, index, url, predicted, timings)

    async def embed(self, url: str) -> np.ndarray:
        """A photo's pooled embedding (unit length), through the same download, decode and
        batches as an ad's images. Raises `ImageRejected` with the image's reason, and
        `ModelUnavailable` when the model cannot answer now."""
        try:
            async with self._host_slot(url), self._in_flight:
                inputs = await self._download_and_prepare(url, time.perf_counter(), {})
            predicted = await self.batcher.predict(inputs)
        except InferenceFailed as exc:
            raise ImageRejected(ImageReason.INFERENCE_ERROR, str(exc)) from exc
        except BatcherStopping as exc:
            raise ModelUnavailable(str(exc)) from exc
        except (ImageRejected, ModelUnavailable):
            raise
        except Exception as exc:  # a task's own preprocessing, a bug: as `process` does
            log.exception("Unexpected error embedding %s", url)
            raise ImageRejected(ImageReason.INTERNAL_ERROR, repr(exc)[:500]) from exc
        embedding = predicted.prediction.embedding
        if embedding is None:
            raise ImageRejected(ImageReason.MODEL_INPUT_MISMATCH, "the model has no embedding")
        vector = np.asarray(embedding, dtype=np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    @contextlib.asynccontextmanager
    async def _host_slot(self, url: str) -> AsyncIterator[None]:
        try:
            host = (URL(url).host or "").lower()
        except (ValueError, TypeError):
            host = ""  # the downloader refuses the URL with its reason
        # A host's semaphore lives while someone holds or awaits it: [semaphore, users].
        entry = self._hosts.setdefault(host, [asyncio.Semaphore(self._per_host), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._hosts[host]

    def longest_retry_delay(self) -> float:
        """The delay of the last retry: no retry is ever due later than this from now."""
        return self.retry_delay_s * 4 ** max(0, self.attempts - 2)

    def abandon_waiting(self) -> None:
        """At shutdown: images not yet in a batch are given up (their ads are processed
        again later); running batches finish."""
        self.batcher.abandon_waiting()

    async def _download_and_prepare(
        self, url: str, started: float, timings: dict[str, float]
    ) -> Inputs:
        self.metrics.downloads_in_progress.inc()
        try:
            try:
                data = await self.downloader.fetch(url)
            except ImageRejected:
                self.metrics.image_downloaded(time.perf_counter() - started, ok=False)
                raise
            timings["download_seconds"] = round(time.perf_counter() - started, 6)
            self.metrics.image_downloaded(timings["download_seconds"], ok=True)
            pixels = await self.preparer.prepare(data)
            timings["preprocess_seconds"] = round(
                time.perf_counter() - started - timings["download_seconds"], 6
            )
            self.metrics.image_prepared(timings["preprocess_seconds"])
            return pixels
        finally:
            self.metrics.downloads_in_progress.dec()

    def _retry(
        self, ad: AdRef, index: int, url: str, attempt: int, failure: ImageRejected
    ) -> ImageRetry:
        delay = self.retry_delay_s * 4 ** (attempt - 1)
        return ImageRetry(
            ad=ad,
            index=index,
            url=url,
            attempt=attempt + 1,
            due_at=time.time() + delay,
            reason=failure.reason,
            message=failure.message,
        )

    def _success(
        self,
        ad: AdRef,
        index: int,
        url: str,
        predicted: BatchedPrediction,
        timings: dict[str, float],
    ) -> ImageOutcome:
        prediction = predicted.prediction
        return ImageOutcome(
            ad=ad,
            index=index,
            url=url,
            labels=[Label(name=label.name, score=label.score) for label in prediction.labels],
            category=prediction.category,
            category_scores=prediction.category_scores,
            model=self.model.name,
            model_version=self.model.version,
            outputs={name: output.as_record() for name, output in prediction.outputs.items()},
            timings={
                **timings,
                "queue_seconds": predicted.queue_seconds,
                "inference_seconds": predicted.inference_seconds,
                "batch_size": predicted.batch_size,
            },
        )

    def _failure(
        self,
        ad: AdRef,
        index: int,
        url: str,
        reason: str,
        message: str,
        started: float,
        timings: dict[str, float],
    ) -> ImageOutcome:
        reached_model = "preprocess_seconds" in timings
        return ImageOutcome(
            ad=ad,
            index=index,
            url=url,
            error=ImageError(reason=reason, message=message),
            model=self.model.name if reached_model else None,
            model_version=self.model.version if reached_model else None,
            timings=timings or {"download_seconds": round(time.perf_counter() - started, 6)},
        )
