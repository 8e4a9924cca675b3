"""Writes finished results to the MongoDB store from a bounded buffer, whatever MongoDB does.

`put` hands a result over and returns at once while the buffer has room; one writer task
drains the buffer in bulks of up to `bulk_size`, so results finishing together (one inference
batch) are written together. A failed bulk is retried with exponential backoff, forever: while
MongoDB is slow or down the stream keeps classifying until the buffer is full, then `put`
waits (backpressure) instead of dropping. Each result's `done` callback runs, in `put` order,
once its write is settled; the caller acknowledges the Kafka event there, so a crash replays
what was buffered and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pymongo.errors import PyMongoError

from classify_app.records import AdResult
from tables.migrations import migrate, pending
from tables.store import ResultStore

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
IDLE_PING_S = 5.0

# Called with the reason MongoDB refused the result for good, or None once it is stored.
Done = Callable[[str | None], Awaitable[None]]


@dataclass
class WriterStats:
    """Counters for metrics, readiness and the benchmarks."""

    written: int = 0
    stale: int = 0
    rejected: int = 0
    bulks: int = 0
    retries: int = 0
    max_buffered: int = 0
    write_seconds: float = 0.0


@dataclass(frozen=True)
class StoreHealth:
    """Whether MongoDB answered the last attempt, and why not."""

    ok: bool
    detail: str


class ResultWriter:
    """The single writer of the store; see the module docstring for the guarantees."""

    def __init__(
        self,
        store: ResultStore,
        *,
        capacity: int,
        bulk_size: int,
        migrate_on_start: bool,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.on_written = on_written
        self.bulk_size = bulk_size
        self.migrate_on_start = migrate_on_start
        self.stats = WriterStats()
        self._buffer: asyncio.Queue[tuple[AdResult, Done]] = asyncio.Queue(maxsize=capacity)
        self._task: asyncio.Task[None] | None = None
        self._schema_ready = False
        self._failing_since: float | None = None
        self._last_error = ""

    @property
    def buffered(self) -> int:
        """Results waiting to be written."""
        return self._buffer.qsize()

    @property
    def health(self) -> StoreHealth:
        """For `readyz`: a failing store degrades the worker, it does not stop it."""
        if self._failing_since is None:
            state = "reachable" if self._schema_ready else "applying migrations"
            return StoreHealth(self._schema_ready, f"{state}; {self.buffered} results buffered")
        return StoreHealth(
            False,
            f"unreachable for {time.monotonic() - self._failing_since:.0f} s "
            f"({self._last_error}); {self.buffered} results buffered",
        )

    def state(self) -> dict[str, float]:
        """Buffer, reachability and counters, for the metrics."""
        return {
            "buffered": self.buffered,
            "up": 1.0 if self.health.ok else 0.0,
            "written": self.stats.written,
            "stale": self.stats.stale,
            "rejected": self.stats.rejected,
            "retries": self.stats.retries,
        }

    async def put(self, result: AdResult, done: Done) -> None:
        """Buffer a result for writing; waits while the buffer is full."""
        await self._buffer.put((result, done))
        self.stats.max_buffered = max(self.stats.max_buffered, self._buffer.qsize())

    def start(self) -> None:
        """Start the writer task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="classify-app-result-writer")

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is buffered for up to `timeout` seconds, then stop; what is left is
        replayed from Kafka by the next owner (its events were not acknowledged)."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self.buffered and self._failing_since is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        await self._retrying(self._ensure_schema)
        while True:
            try:
                first = await asyncio.wait_for(self._buffer.get(), IDLE_PING_S)
            except TimeoutError:
                await self._check_reachable()
                continue
            bulk = [first]
            while len(bulk) < self.bulk_size and not self._buffer.empty():
                bulk.append(self._buffer.get_nowait())
            results = [result for result, _ in bulk]
            rejected = await self._retrying(functools.partial(self._write, results))
            for result, done in bulk:
                try:
                    await done(rejected.get(result.ad_id))
                except Exception:
                    # The event stays unacknowledged (replayed after a restart); the writer
                    # must go on for the others.
                    log.exception("Settling the result of ad %s failed", result.ad_id)

    async def _write(self, results: list[AdResult]) -> dict[str, str]:
        started = time.perf_counter()
        try:
            report = await self.store.upsert_many(results)
        except PyMongoError:
            raise  # MongoDB's trouble: retried
        except Exception as exc:
            # Not MongoDB's trouble (a document BSON cannot encode, a bug): retrying would
            # stall the stream forever, so the bulk is refused and dead-lettered, with why.
            log.exception("Writing %d results failed", len(results))
            self.stats.rejected += len(results)
            return {result.ad_id: f"{type(exc).__name__}: {exc}" for result in results}
        seconds = time.perf_counter() - started
        self.stats.write_seconds += seconds
        if self.on_written is not None:
            self.on_written(seconds)
        self.stats.bulks += 1
        self.stats.written += len(report.written)
        self.stats.stale += len(report.stale)
        self.stats.rejected += len(report.rejected)
        for ad_id, reason in report.rejected.items():
            log.error("MongoDB refused the result of ad %s: %s", ad_id, reason)
        return report.rejected

    async def _ensure_schema(self) -> None:
        if self.migrate_on_start:
            await migrate(self.store)
        else:
            waiting = await pending(self.store)
            if waiting:
                log.warning(
                    "MongoDB migrations %s are pending: run `faust -A classify_app migrate`",
                    waiting,
                )
        self._schema_ready = True

    async def _check_reachable(self) -> None:
        try:
            await self.store.ping()
        except PyMongoError as exc:
            self._failed(exc)
        else:
            self._recovered()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                value = await attempt()
            except PyMongoError as exc:
                self._failed(exc)
                self.stats.retries += 1
                # Full jitter: workers that lost MongoDB together do not return together.
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self._recovered()
            return value

    def _failed(self, exc: PyMongoError) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("MongoDB is unreachable, buffering results: %s", exc)
        self._last_error = type(exc).__name__

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info(
                "MongoDB is back after %.1f s; %d results buffered",
                time.monotonic() - self._failing_since,
                self.buffered,
            )
            self._failing_since = None
