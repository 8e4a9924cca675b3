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
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pymongo.errors import OperationFailure, PyMongoError

from classify_app.records import AdResult
from tables.migrations import migrate, pending
from tables.store import ResultStore

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
IDLE_PING_S = 5.0
# Server errors that mean "not now" (not primary, shutting down, write concern), not "never".
RETRYABLE = frozenset({91, 189, 10107, 11600, 11602, 13435, 13436, 64, 6, 7, 89, 9001, 262})

# Called with the reason MongoDB refused the result for good, or None once it is stored.
Done = Callable[[str | None], Awaitable[None]]
# Called instead of `Done` when the result is handed back unwritten (a rebalance or a stop):
# its event is left for the next owner to replay.
GiveBack = Callable[[], None]
# Deterministic failures: retrying at MongoDB's pace would not help (a migration whose unique
# index the data already breaks). Retried slowly, said in readiness.
PERMANENT_RETRY_S = 60.0


@dataclass
class _Pending:
    result: AdResult
    done: Done
    give_back: GiveBack


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
    # An operator must act (a migration fails on the data): not ready, not merely degraded.
    broken: bool = False


class ResultWriter:
    """The single writer of the store; see the module docstring for the guarantees."""

    def __init__(
        self,
        store: ResultStore,
        *,
        capacity: int,
        bulk_size: int,
        migrate_on_start: bool,
        max_bytes: int = 64 * 2**20,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.on_written = on_written
        self.bulk_size = bulk_size
        self.migrate_on_start = migrate_on_start
        self.stats = WriterStats()
        self.max_bytes = max_bytes
        self._buffer: deque[_Pending] = deque()
        self._bulk: list[_Pending] = []  # being written
        self._buffered_bytes = 0
        self._sizes: dict[int, int] = {}
        self._room = asyncio.Condition()
        self._arrived = asyncio.Event()
        self.capacity = capacity
        self._task: asyncio.Task[None] | None = None
        self._schema_ready = False
        self._failing_since: float | None = None
        self._last_error = ""
        self._schema_error: str | None = None

    @property
    def buffered(self) -> int:
        """Results waiting to be written (and being written)."""
        return len(self._buffer) + len(self._bulk)

    @property
    def health(self) -> StoreHealth:
        """For `readyz`: a failing store degrades the worker, it does not stop it; a schema
        that cannot be applied makes it unready."""
        if self._schema_error is not None:
            return StoreHealth(False, self._schema_error, broken=True)
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

    async def put(self, result: AdResult, done: Done, give_back: GiveBack) -> None:
        """Buffer a result for writing; waits while the buffer is full (in results or bytes:
        a result's size is that of its JSON)."""
        size = len(result.dumps())
        async with self._room:
            await self._room.wait_for(
                lambda: (
                    not self._buffer
                    or (
                        len(self._buffer) < self.capacity
                        and self._buffered_bytes + size <= self.max_bytes
                    )
                )
            )
            pending = _Pending(result, done, give_back)
            self._sizes[id(pending)] = size
            self._buffered_bytes += size
            self._buffer.append(pending)
        self.stats.max_buffered = max(self.stats.max_buffered, self.buffered)
        self._arrived.set()

    def start(self) -> None:
        """Start the writer task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="classify-app-result-writer")

    async def give_back(self) -> int:
        """Hand every unwritten result back (a rebalance, a stop while MongoDB is down): the
        writing stops, each result's `give_back` runs, and the writer starts afresh. Returns
        how many were handed back. Their events are replayed; the upserts are idempotent."""
        running = self._task is not None
        await self._cancel()
        handed = [*self._bulk, *self._buffer]
        self._bulk, self._buffer = [], deque()
        for item in handed:
            self._release_room(item)
            item.give_back()
        async with self._room:
            self._room.notify_all()
        if running:
            self.start()
        return len(handed)

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is buffered for up to `timeout` seconds while MongoDB answers, then hand
        back the rest and stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self.buffered and self._failing_since is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._cancel()
        await self.give_back()

    async def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise  # the caller is cancelled too: not ours to swallow
            finally:
                self._task = None

    def _release_room(self, pending: _Pending) -> None:
        self._buffered_bytes -= self._sizes.pop(id(pending), 0)

    async def _run(self) -> None:
        await self._ensure_schema_retrying()
        while True:
            _raise_if_cancelled()
            if not self._buffer:
                self._arrived.clear()
                try:
                    # Not `wait_for`: on Python 3.11 it swallows a cancellation that comes as
                    # a result arrives, and `give_back` waited forever in a rebalance.
                    async with asyncio.timeout(IDLE_PING_S):
                        await self._arrived.wait()
                except TimeoutError:
                    await self._check_reachable()
                continue
            while self._buffer and len(self._bulk) < self.bulk_size:
                self._bulk.append(self._buffer.popleft())
            async with self._room:
                for item in self._bulk:
                    self._release_room(item)
                self._room.notify_all()
            results = [item.result for item in self._bulk]
            rejected = await self._retrying(functools.partial(self._write, results))
            bulk, self._bulk = self._bulk, []
            for item in bulk:
                try:
                    await item.done(rejected.get(item.result.ad_id))
                except Exception:
                    # The event stays unacknowledged (replayed after a restart); the writer
                    # must go on for the others.
                    log.exception("Settling the result of ad %s failed", item.result.ad_id)

    async def _write(self, results: list[AdResult]) -> dict[str, str]:
        started = time.perf_counter()
        try:
            report = await self.store.upsert_many(results)
        except PyMongoError:
            raise  # MongoDB's trouble: retried
        except Exception as exc:
            # Not MongoDB's trouble (a document BSON cannot encode, a bug): retrying would
            # stall the stream forever. Each result is written alone, so that only the ones
            # that cannot be are refused (and dead-lettered, with why).
            if len(results) > 1:
                log.warning("Writing %d results failed (%r): one at a time", len(results), exc)
                refused: dict[str, str] = {}
                for result in results:
                    refused.update(await self._write([result]))
                return refused
            log.exception("Writing the result of ad %s failed", results[0].ad_id)
            self.stats.rejected += 1
            return {results[0].ad_id: f"{type(exc).__name__}: {exc}"[:2000]}
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

    async def _ensure_schema_retrying(self) -> None:
        """Apply the schema, retrying while MongoDB is unreachable; a migration that fails
        on the data itself (`OperationFailure`) is said in readiness and tried again slowly."""
        while True:
            try:
                await self._retrying(self._ensure_schema)
                self._schema_error = None
                return
            except OperationFailure as exc:
                self._schema_error = f"a migration failed on the data: {exc}"[:500]
                log.error("MongoDB migration failed (the data must be fixed): %s", exc)
                await asyncio.sleep(PERMANENT_RETRY_S)

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
            _raise_if_cancelled()
            self._failed(exc)
        else:
            self._recovered()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt` until MongoDB answers it. `OperationFailure` other than a write concern
        or a not-primary error is MongoDB answering: raised, not retried."""
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                value = await attempt()
                _raise_if_cancelled()
            except PyMongoError as exc:
                _raise_if_cancelled()
                if isinstance(exc, OperationFailure) and not (
                    exc.has_error_label("RetryableWriteError") or exc.code in RETRYABLE
                ):
                    raise
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


def _being_cancelled() -> bool:
    """Whether the running task has been asked to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _raise_if_cancelled() -> None:
    """After an await into PyMongo: it can lose a cancellation (it finishes an operation the
    cancellation came in, or raises `AutoReconnect("operation cancelled")` for it, which a
    retry would take for an outage), and the writer would outlive its `give_back`."""
    if _being_cancelled():
        raise asyncio.CancelledError
