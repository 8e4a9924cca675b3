"""Prometheus metrics of one worker, served at `GET /metrics` (prometheus-client).

Every stage reports through the functions below, named after what happened (`image_downloaded`,
`batch_classified`, `ad_finished`, ...), so a stage's code says nothing about metric types.
Values that exist anyway (consumer offsets, GPU memory, the MongoDB writer's counters) are read
at scrape time by `WorkerCollector` instead of being copied on every event. Names follow the
Prometheus conventions: `classify_` prefix, base units, `_seconds`, `_bytes`, `_total`.
With `CLASSIFY_METRICS=false` every function returns at once and `/metrics` answers 404.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from classify_app.records import AdResult
from classify_app.vocabulary import Status

CONTENT_TYPE = "text/plain; version=0.0.4"  # aiohttp adds no charset; UTF-8 is the default
# Seconds: from a fast local download to the download timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The worker's metrics on their own registry (a test may build a second one)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        self.download_seconds = Histogram(
            "classify_download_seconds",
            "Time to download one image, by outcome (ok or failed).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "classify_preprocess_seconds",
            "Time to decode and preprocess one downloaded image (off the event loop).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "classify_queue_wait_seconds",
            "Time a prepared image waited for its inference batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "classify_inference_seconds",
            "Model compute time per inference batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "classify_batch_size",
            "Images per inference batch (mean batch = sum / count).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "classify_end_to_end_seconds",
            "Time from the ad event's timestamp to its final result in the results table.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ads = Counter(
            "classify_ads", "Ads with a final result, by status.", ["status"], registry=r
        )
        self.images = Counter(
            "classify_images", "Images of finished ads, by status.", ["status"], registry=r
        )
        self.image_failures = Counter(
            "classify_image_failures",
            "Images without a prediction, by reason code.",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "classify_dead_letters",
            "Events sent to the dead-letter topic, by reason code.",
            ["reason"],
            registry=r,
        )
        self.unknown_fields_seen = Counter(
            "classify_event_unknown_fields",
            "Fields of ad events that nothing reads (ignored; refused in strict mode).",
            registry=r,
        )
        self.duplicates = Counter(
            "classify_duplicate_ads",
            "Final results with an image nearly repeating an earlier ad's (similarity index).",
            registry=r,
        )
        self.outcomes = Counter(
            "classify_outcomes",
            "Image outcomes and announcements of ads, by the way they reached the results table "
            "(local: folded by the download stage; topic: through the outcomes topic).",
            ["route"],
            registry=r,
        )
        self.download_retries = Counter(
            "classify_download_retries",
            "Downloads scheduled for another attempt after a transient failure, by reason.",
            ["reason"],
            registry=r,
        )
        self.downloads_in_progress = Gauge(
            "classify_downloads_in_progress",
            "Images being downloaded or preprocessed right now.",
            registry=r,
        )
        self.store_write_seconds = Histogram(
            "classify_store_write_seconds",
            "Time of one MongoDB bulk write that succeeded.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model = Info("classify_model", "The model this worker serves.", registry=r)
        self.gc_pause_seconds = Histogram(
            "classify_gc_pause_seconds",
            "Time the garbage collector stopped the process, by generation.",
            ["generation"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
            registry=r,
        )
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Time every garbage collection (`gc.callbacks`); called once at worker start."""
        if self.enabled and self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause_seconds.labels(str(info["generation"])).observe(
                time.perf_counter() - self._gc_started
            )

    def image_downloaded(self, seconds: float, ok: bool) -> None:
        """One download ended (`ok` False: an error, with its reason in the outcome)."""
        if self.enabled:
            self.download_seconds.labels("ok" if ok else "failed").observe(seconds)

    def unknown_fields(self, count: int) -> None:
        """An accepted ad event carried `count` fields that nothing reads."""
        if self.enabled:
            self.unknown_fields_seen.inc(count)

    def outcome_routed(self, route: str) -> None:
        """An outcome (or an announcement) went to the results table by `route`."""
        if self.enabled:
            self.outcomes.labels(route).inc()

    def download_retried(self, reason: str) -> None:
        """A transient download failure was sent to the retry stage."""
        if self.enabled:
            self.download_retries.labels(reason).inc()

    def image_prepared(self, seconds: float) -> None:
        """One image was decoded and preprocessed."""
        if self.enabled:
            self.preprocess_seconds.observe(seconds)

    def batch_classified(self, size: int, seconds: float, queue_waits: list[float]) -> None:
        """An inference batch of `size` images ran for `seconds`."""
        if self.enabled:
            self.batch_size.observe(size)
            self.inference_seconds.observe(seconds)
            for wait in queue_waits:
                self.queue_wait_seconds.observe(wait)

    def ad_finished(self, result: AdResult, now: float) -> None:
        """An ad's result became final (once per ad: replays do not call this again)."""
        if not self.enabled:
            return
        self.ads.labels(result.status).inc()
        self.end_to_end_seconds.observe(max(0.0, now - result.submitted_at))
        for image in result.images:
            self.images.labels(image.status).inc()
            if image.status == Status.FAILED and image.error is not None:
                self.image_failures.labels(image.error.reason).inc()

    def dead_lettered(self, reason: str) -> None:
        """An event went to the dead-letter topic."""
        if self.enabled:
            self.dead_letters.labels(reason).inc()

    def store_written(self, seconds: float) -> None:
        """A MongoDB bulk write succeeded."""
        if self.enabled:
            self.store_write_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class WorkerCollector(Collector):
    """Reads, at scrape time, what the worker keeps anyway; each source is a callable that
    returns its current values, so this module needs no Faust, torch or MongoDB import."""

    def __init__(
        self,
        *,
        lag: Callable[[], dict[tuple[str, int], int]],
        images_waiting: Callable[[], int],
        gpu_memory: Callable[[], dict[str, Any] | None],
        store: Callable[[], dict[str, float] | None],
        similarity: Callable[[], dict[str, float] | None] = lambda: None,
    ) -> None:
        self._lag = lag
        self._similarity = similarity
        self._images_waiting = images_waiting
        self._gpu_memory = gpu_memory
        self._store = store

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus-client on every scrape."""
        lag = GaugeMetricFamily(
            "classify_consumer_lag",
            "Messages not yet committed on each assigned partition (highwater - committed).",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self._lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "classify_images_waiting_for_inference",
            "Images handed to inference on this worker and not yet classified.",
            value=self._images_waiting(),
        )
        gpu = self._gpu_memory()
        if gpu is not None:
            for kind in ("allocated", "reserved", "max_allocated"):
                yield GaugeMetricFamily(
                    f"classify_gpu_memory_{kind}_bytes",
                    f"CUDA memory {kind.replace('_', ' ')} by PyTorch on this worker's device.",
                    value=gpu[kind],
                )
        similarity = self._similarity()
        if similarity is not None:
            yield GaugeMetricFamily(
                "classify_similarity_indexed_images",
                "Images of every ad in this worker's similarity index.",
                value=similarity["images"],
            )
            yield GaugeMetricFamily(
                "classify_similarity_caught_up",
                "1 once the similarity index has read the vectors topic up to its start.",
                value=similarity["caught_up"],
            )
        store = self._store()
        if store is not None:
            yield GaugeMetricFamily(
                "classify_store_buffered_results",
                "Results waiting to be written to MongoDB.",
                value=store["buffered"],
            )
            yield GaugeMetricFamily(
                "classify_store_up",
                "1 when the last MongoDB attempt succeeded, else 0.",
                value=store["up"],
            )
            results = CounterMetricFamily(
                "classify_store_results",
                "Results sent to MongoDB, by outcome (written, stale, rejected).",
                labels=["outcome"],
            )
            for outcome in ("written", "stale", "rejected"):
                results.add_metric([outcome], store[outcome])
            yield results
            yield CounterMetricFamily(
                "classify_store_retries",
                "MongoDB attempts that failed and were retried.",
                value=store["retries"],
            )
