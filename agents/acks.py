"""Concurrent processing of a stream's events, acknowledged strictly in offset order.

The download stage spends most of its time waiting on image servers, so it handles many ads at
once. Acknowledging them in offset order per partition keeps the committed offset an honest
"everything before this is done": a crash replays only the ads that were in flight. (Faust's
own `concurrency=N` acks out of order, and its commit check then relied on a gap test that is
off by one; `classify_app.consumer` fixes that test too, so either defect alone loses nothing.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from faust.types import TP, EventT, StreamT

log = logging.getLogger(__name__)


class LeaveUnacknowledged(Exception):
    """Raised by a handler that could not finish for reasons outside its event (the model
    cannot load, the producer fails, the worker stops): the event is not acknowledged. The
    consumer (`classify_app.consumer`) commits nothing past an unacknowledged offset and
    fetches it again, so it is processed again, here or after a restart or rebalance.
    """


class InOrderAcks:
    """Runs up to `limit` event handlers at once; acks events in offset order per partition.

    Used by an agent that iterates `stream.noack()`: `submit` waits for a free slot, starts the
    handler, and returns; an event is acked once it and every earlier event of its partition
    are done. A handler should not raise; if one does, the error is logged and the event is
    acked, so that one bad event cannot stall its partition. The event of a handler that
    raises `LeaveUnacknowledged`, or is cancelled, is not acked.
    """

    def __init__(
        self, stream: StreamT, limit: int, release: Callable[[EventT], None] | None = None
    ) -> None:
        self._stream = stream
        self._release = release
        self._slots = asyncio.Semaphore(limit)
        self._in_flight: dict[TP, deque[tuple[EventT, asyncio.Task[None]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ack_lock = asyncio.Lock()

    async def submit(self, event: EventT, handler: Coroutine[Any, Any, None]) -> None:
        """Start `handler` for `event` as soon as fewer than `limit` handlers run."""
        await self._slots.acquire()
        task = asyncio.ensure_future(handler)
        self._tasks.add(task)
        self._in_flight.setdefault(event.message.tp, deque()).append((event, task))
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        error = None if task.cancelled() else task.exception()
        if isinstance(error, LeaveUnacknowledged):
            log.warning("Event left unacknowledged, to be processed again: %s", error)
        elif error is not None:
            log.error("Event handler failed", exc_info=error)
        acking = asyncio.ensure_future(self._ack_finished())
        self._tasks.add(acking)
        acking.add_done_callback(self._tasks.discard)

    async def _ack_finished(self) -> None:
        async with self._ack_lock:  # one drainer at a time keeps the acks in order
            for queue in self._in_flight.values():
                while queue and queue[0][1].done():
                    event, task = queue.popleft()
                    if _acknowledged(task):
                        await self._stream.ack(event)

    async def give_back(self) -> int:
        """Stop every running handler and hand its event back unacknowledged (`release`):
        before a rebalance or a stop, work in flight is done again by the next owner instead
        of being waited for. Returns how many were given back."""
        given = 0
        async with self._ack_lock:
            for queue in self._in_flight.values():
                for event, task in queue:
                    if not task.done():
                        task.cancel()
                    if not event.message.acked and self._release is not None:
                        self._release(event)
                    given += 1
            self._in_flight.clear()
        return given

    async def drain(self) -> None:
        """Wait for every running handler and its ack (on agent shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _acknowledged(task: asyncio.Task[None]) -> bool:
    """Whether a finished handler's event may be acked."""
    return not task.cancelled() and not isinstance(task.exception(), LeaveUnacknowledged)
