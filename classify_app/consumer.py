"""Faust's Kafka consumer, made to keep its at-least-once promise.

Faust commits an offset once every event before it is acknowledged. Four defects in
faust-streaming 0.15 let it commit events that were never processed; each was seen here as ads
left `pending` forever after a worker was killed and restarted (tests/integration). They are
open upstream: faust-streaming/faust#606, with fixes proposed in PR #707 (not merged).

1. Its commit check is off by one (`Consumer._new_offset`): with the event right after the
   last commit unfinished and later ones done, it commits past the unfinished one.
2. When fetched offsets jump, it treats the missing ones as acknowledged (`_add_gap`): right
   for compacted or transactional topics, which this service does not consume, and wrong
   when records were fetched and then dropped, as happens around start-up and rebalances.
3. A stream skips events that arrive while flow control is suspended (a rebalance) or that
   belong to an older consumer generation, and acknowledges them anyway.
4. It hands its live set of active partitions to the consumer thread while the event loop
   changes it; when the set is momentarily empty, aiokafka returns every partition's records
   and Faust drops those of paused partitions.

`Consumer` fixes 1-3: it acknowledges only events handled in the current generation, commits
only runs that start right at the committed offset, and when a hole stays open it seeks the
partition back so that the missing events are fetched again (they may be processed twice:
every stage is idempotent). `ConsumerThread` fixes 4.

Delete this module when a faust-streaming release carries the fixes of #707 (or others for
#606) and `tests/integration/test_crashes.py` passes with Faust's own consumer.
"""

from __future__ import annotations

import logging
from typing import Any

from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from faust.utils.functional import consecutive_numbers
from mode.utils.futures import notify

log = logging.getLogger(__name__)

# How long an offset may stay missing before the partition is fetched again from there.
HOLE_REPAIR_SECONDS = 5.0


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Fetches from a snapshot of the active partitions, and from none when it is empty; waits
    at most `Consumer.fetch_max_wait_ms` in a fetch when that is set."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.consumer, "fetch_max_wait_ms", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait
        return consumer

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        partitions = set(active_partitions)
        if not partitions:
            return {}
        return await super()._fetch_records(
            consumer, partitions, timeout=timeout, max_records=max_records
        )


class Consumer(aiokafka_driver.Consumer):
    """Commits only what was handled; re-fetches offsets that went missing.

    `fetch_max_wait_ms`: Faust's driver waits up to 1.5 s in every fetch. Kafka answers a
    fetch as soon as data arrives (long polling); a broker that always waits the full time
    (Tansu, the development broker) turns that wait into latency, so its profile shortens it.
    """

    fetch_max_wait_ms: int | None = None

    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_start(self) -> None:
        """Start Faust's consumer, then the hole watcher."""
        await super().on_start()
        self._holes: dict[TP, int] = {}
        self.add_future(self._watch_holes())

    def ack(self, message: Message) -> bool:
        """Acknowledge a handled event; ignore Faust's acknowledgements of skipped ones."""
        app = self.app
        if message.generation_id != app.consumer_generation_id or not app.flow_control.is_active():
            # Fetched again after the rebalance (or the restart), and handled then. Released
            # without committing: Faust's shutdown waits until no fetched event is unacked.
            with ack_lock:
                message.acked = True
                self._unacked_messages.discard(message)
                notify(self._waiting_for_ack)
            return False
        return super().ack(message)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # The topics consumed here have contiguous offsets: a jump means records were dropped,
        # never that they do not exist. Leave them unacknowledged for _watch_holes to repair.
        log.debug("Offsets %s..%s of %s arrived out of order", offset_from, offset_to - 1, tp)

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is not None and acked[0] > committed:
            return None  # the event at the committed offset is not done yet
        run = next(consecutive_numbers(acked))
        del acked[: len(run)]
        self._acked_index[tp].difference_update(run)
        return run[-1] + 1

    def holes(self) -> dict[TP, int]:
        """Partitions whose next uncommitted offset is missing while later ones are done."""
        return {
            tp: committed
            for tp, acked in list(self._acked.items())
            if acked
            and (committed := self._committed_offset.get(tp)) is not None
            and min(acked) > committed
        }

    def lag(self) -> dict[tuple[str, int], int]:
        """Highwater minus committed offset of each assigned partition of a consumed topic."""
        lag = {}
        for tp in self.assignment():
            if tp.topic.endswith("-changelog") or "__assignor" in tp.topic:
                continue  # read only to recover tables, never committed: their lag means nothing
            highwater = self.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            committed = self._committed_offset.get(tp) or 0
            lag[(tp.topic, tp.partition)] = max(0, highwater - committed)
        return lag

    async def _watch_holes(self) -> None:
        """Seek a partition back when a hole stays open for `HOLE_REPAIR_SECONDS`."""
        while not self.should_stop:
            await self.sleep(HOLE_REPAIR_SECONDS)
            holes = self.holes()
            stuck = {
                tp: committed
                for tp, committed in holes.items()
                if self._holes.get(tp) == committed and tp in self.assignment()
            }
            if stuck:
                log.warning("Offsets never delivered, fetching again from: %s", stuck)
                # In the consumer's own thread: aiokafka is not thread-safe.
                await self.seek_wait(stuck)
            self._holes = holes
