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
only runs that start right at the committed offset (or, on a partition never committed, at
its first offset), and when a hole stays open it asks the broker which of the missing offsets
exist. Those that do not (transaction markers of a transactional producer, records removed by
compaction or retention) are passed over; those that do were dropped or left unacknowledged,
and the partition is fetched again from the first of them (they may be processed twice: every
stage is idempotent), a bounded number of times before it backs off. `ReadOffsets` keeps such
a rewind from being undone by the batch that was being delivered when it happened.
`ConsumerThread` fixes 4.

Delete this module when a faust-streaming release carries the fixes of #707 (or others for
#606) and `tests/integration/test_crashes.py` passes with Faust's own consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from faust.utils.functional import consecutive_numbers
from mode.utils.futures import notify

from models.runtime import name_this_thread

log = logging.getLogger(__name__)

# How long an offset may stay missing before the broker is asked about it.
HOLE_REPAIR_SECONDS = 5.0
WATCH_SECONDS = 1.0
# Rewinds to one offset before the watcher waits longer between them (doubling, up to 5 min).
MAX_QUICK_REPAIRS = 3
MAX_REPAIR_BACKOFF_SECONDS = 300.0
# Records fetched per question to the broker about missing offsets.
PROBE_MAX_RECORDS = 10_000


class ReadOffsets(dict[TP, int | None]):
    """Faust's per-partition read offset (the last delivered), holding a rewind: after
    `rewind(tp, offset)`, records of a batch fetched before the rewind cannot move the read
    offset past `offset` again (they would make the drain loop drop the records fetched anew)
    until the record at `offset` itself is read."""

    def __init__(self) -> None:
        super().__init__()
        self.floors: dict[TP, int] = {}

    def __missing__(self, tp: TP) -> None:
        return None

    def rewind(self, tp: TP, offset: int) -> None:
        """The partition is fetched again from `offset`: the record there is read next."""
        self.floors[tp] = offset
        super().__setitem__(tp, offset or None)

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        floor = self.floors.get(tp)
        if floor is not None and offset is not None:
            if offset > floor:
                return  # a record of the batch fetched before the rewind
            del self.floors[tp]  # the record at the rewind offset was read again
        super().__setitem__(tp, offset)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """A seek to the committed offsets (rebalance) supersedes every rewind."""
        self.floors.clear()
        super().update(*args, **kwargs)


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Fetches from a snapshot of the active partitions, and from none when it is empty; waits
    at most `Consumer.fetch_max_wait_ms` in a fetch when that is set."""

    async def on_thread_started(self) -> None:
        name_this_thread("kafka-consumer")
        await super().on_thread_started()

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset: ReadOffsets = ReadOffsets()
        self._start_offset: dict[TP, int] = {}  # first offset of partitions never committed
        self._holes: dict[TP, int] = {}
        self._repairs: dict[tuple[TP, int], tuple[int, float]] = {}  # -> (count, not before)
        self._probe: Any = None
        self._watcher: Any = None
        # Partitions whose records found a stream buffer nearly full: each waits for its own
        # call of `on_buffer_drop` (the buffer registers one per partition).
        self._pressured: set[TP] = set()

    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_start(self) -> None:
        """Start Faust's consumer, then the hole watcher."""
        await super().on_start()
        self._watcher = self.add_future(self._watch_holes())

    async def on_stop(self) -> None:
        """Stop the hole watcher, then close its client (a question in flight would hold it)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        if self._probe is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._probe.stop()
            self._probe = None
        await super().on_stop()

    def ack(self, message: Message) -> bool:
        """Acknowledge a handled event; ignore Faust's acknowledgements of skipped ones."""
        app = self.app
        if message.generation_id != app.consumer_generation_id or not app.flow_control.is_active():
            # Fetched again after the rebalance (or the restart), and handled then.
            self.release(message)
            return False
        return super().ack(message)

    def release(self, message: Message) -> None:
        """Stop waiting for an event without committing it: Faust's rebalance and shutdown
        wait until no fetched event is unacknowledged; this one will be fetched again."""
        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
            notify(self._waiting_for_ack)

    def on_buffer_full(self, tp: TP) -> None:
        """A stream's buffer is nearly full: stop fetching every partition of its topic (they
        share the buffer), not only the one whose record found it so."""
        # With the others still fetched, each of their polls waited for room in the buffer,
        # and the records of every other topic waited behind it: under a backlog of ads, the
        # image outcomes went unread for 10-20 s at a time.
        self._pressured.add(tp)
        sharing = {
            tp,
            *(other for other in self._get_active_partitions() if other.topic == tp.topic),
        }
        for other in sharing:
            super().on_buffer_full(other)

    def on_buffer_drop(self, tp: TP) -> None:
        """The buffer has room again: fetch the partitions its filling stopped, except those
        still waiting for their own drop, and those a rebalance or recovery paused."""
        self._pressured.discard(tp)
        for other in [other for other in self._buffered_partitions if other.topic == tp.topic]:
            if other in self._paused_partitions:
                # Whoever paused it resumes it (Faust's own drop would fetch it again here).
                self._buffered_partitions.discard(other)
            elif other not in self._pressured:
                # One still waiting is resumed by its own drop: resumed before, its records
                # would no longer tell the buffer's high mark (its drop is already pending).
                super().on_buffer_drop(other)

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
        if committed is None:
            committed = self._start_offset.get(tp)
            if committed is None:
                return None  # where the partition starts is not known yet
        if acked[0] > committed:
            return None  # the event at the committed offset is not done yet
        run = next(consecutive_numbers(acked))
        del acked[: len(run)]
        self._acked_index[tp].difference_update(run)
        return run[-1] + 1

    def holes(self) -> dict[TP, int]:
        """Partitions whose next uncommitted offset is missing while later ones are done."""
        holes = {}
        for tp, acked in list(self._acked.items()):
            committed = self._committed_offset.get(tp)
            if committed is None:
                committed = self._start_offset.get(tp)
            if acked and committed is not None and min(acked) > committed:
                holes[tp] = committed
        return holes

    def tails(self) -> dict[TP, tuple[int, int]]:
        """Partitions committed short of their end with nothing fetched to finish: a trailing
        transaction marker (nothing after it to tell it apart from a record not fetched yet).
        -> (committed, highwater)."""
        busy = {message.tp for message in list(self._unacked_messages)}
        tails = {}
        for tp in self.assignment():
            committed = self._committed_offset.get(tp)
            highwater = self.highwater(tp)
            if (
                committed is not None
                and highwater is not None
                and highwater > committed
                and not self._acked.get(tp)
                and tp not in busy
            ):
                tails[tp] = (committed, highwater)
        return tails

    def pass_over(self, tp: TP, offsets: list[int]) -> None:
        """Count offsets the broker does not have as done: nothing will ever arrive there."""
        index = self._acked_index[tp]
        for offset in offsets:
            if offset not in index:
                index.add(offset)
                self._acked[tp].append(offset)

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
        """Once a second: learn where never-committed partitions start; and when a hole has
        stayed open for `HOLE_REPAIR_SECONDS`, resolve it with the broker's help."""
        open_since: dict[tuple[TP, int], float] = {}
        tail_since: dict[tuple[TP, tuple[int, int]], float] = {}
        # Tails found to hold records: asked about again only once they change.
        holding: set[tuple[TP, tuple[int, int]]] = set()
        while not self.should_stop:
            await self.sleep(WATCH_SECONDS)
            try:
                await self._learn_start_offsets()
                now = time.monotonic()
                holes = self.holes()
                open_since = {hole: open_since.get(hole, now) for hole in holes.items()}
                if self.app.rebalancing or not self.app.flow_control.is_active():
                    continue  # what is fetched now is fetched again after the rebalance
                for (tp, committed), since in open_since.items():
                    if now - since >= HOLE_REPAIR_SECONDS and tp in self.assignment():
                        await self._resolve_hole(tp, committed, now)
                tails = self.tails()
                tail_since = {tail: tail_since.get(tail, now) for tail in tails.items()}
                holding &= tail_since.keys()
                due = [t for t, since in tail_since.items() if now - since >= HOLE_REPAIR_SECONDS]
                for tail in due:
                    if tail not in holding and not await self._resolve_tail(tail[0], *tail[1]):
                        holding.add(tail)
            except Exception:
                log.exception("Resolving missing offsets failed; trying again")

    async def _learn_start_offsets(self) -> None:
        unknown = [
            tp
            for tp, acked in list(self._acked.items())
            if acked and self._committed_offset.get(tp) is None and tp not in self._start_offset
        ]
        if unknown:
            probe = await self._probe_client()
            starts = await probe.beginning_offsets([_kafka_tp(tp) for tp in unknown])
            for tp in unknown:
                self._start_offset[tp] = starts[_kafka_tp(tp)]

    async def _resolve_hole(self, tp: TP, committed: int, now: float) -> None:
        """Every offset the broker does not have, up to the last one done, is passed over at
        once (one marker per transaction); the first one it has is fetched again."""
        done = set(self._acked[tp])
        end = max(done) + 1
        existing = await self._existing_offsets(tp, committed, end)
        missing = [o for o in range(committed, end) if o not in existing and o not in done]
        existing -= done
        if missing:
            log.info(
                "Offsets %s..%s of %s do not exist (transaction markers, compaction or "
                "retention): passed over",
                missing[0],
                missing[-1],
                tp,
            )
            self.pass_over(tp, missing)
        if not existing:
            return
        target = min(existing)
        count, not_before = self._repairs.get((tp, target), (0, 0.0))
        if now < not_before:
            return
        # Every HOLE_REPAIR_SECONDS at first, then ever more slowly: no livelock.
        backoff = min(
            MAX_REPAIR_BACKOFF_SECONDS,
            HOLE_REPAIR_SECONDS * 2 ** max(0, count + 1 - MAX_QUICK_REPAIRS),
        )
        self._repairs[(tp, target)] = (count + 1, now + backoff)
        log.warning(
            "Offset %s of %s was never acknowledged, fetching again from there (attempt %d)",
            target,
            tp,
            count + 1,
        )
        # In the consumer's own thread: aiokafka is not thread-safe.
        thread: Any = self._thread
        await thread.call_thread(_seek, thread._ensure_consumer(), _kafka_tp(tp), target)
        self._read_offset.rewind(tp, target)

    async def _resolve_tail(self, tp: TP, committed: int, highwater: int) -> bool:
        """Pass over a tail of markers; False when the tail holds records (they are still
        to be delivered)."""
        # Under load a partition looks like a tail while its next records wait in the
        # consumer's buffer: the first record found settles the question.
        if await self._existing_offsets(tp, committed, highwater, first_only=True):
            return False
        log.info(
            "Offsets %s..%s at the end of %s do not exist (transaction markers): passed over",
            committed,
            highwater - 1,
            tp,
        )
        self.pass_over(tp, list(range(committed, highwater)))
        return True

    async def _existing_offsets(
        self, tp: TP, start: int, end: int, *, first_only: bool = False
    ) -> set[int]:
        """The offsets in [start, end) that the broker has records at. The client skips what
        is no record (transaction markers, aborted or compacted data) and moves past it; what
        lies beyond where it got is assumed to exist (fetching again is safe). `first_only`:
        whether any record exists is the question; the first one found answers it, and only
        the records up to it are decoded."""
        probe = await self._probe_client()
        kafka_tp = _kafka_tp(tp)
        probe.assign([kafka_tp])
        # From the record before: a fetch that meets only a control batch (a trailing marker)
        # may not move the client's position; one that returns a record and then the marker
        # does.
        position = max(0, start - 1)
        probe.seek(kafka_tp, position)
        found: set[int] = set()
        # The record before `start`, then the first one from it.
        max_records = 2 if first_only else PROBE_MAX_RECORDS
        while position < end:
            batch = await probe.getmany(kafka_tp, timeout_ms=2000, max_records=max_records)
            found.update(
                record.offset for record in batch.get(kafka_tp, []) if start <= record.offset < end
            )
            if first_only and found:
                return found
            reached = await probe.position(kafka_tp)
            if reached <= position:
                break  # nothing more the broker would give now
            position = reached
        found.update(range(max(position, start), end))
        return found

    async def _probe_client(self) -> Any:
        """A group-less client on the same cluster and credentials, for questions about
        offsets (the worker's own consumer belongs to its thread)."""
        if self._probe is None:
            transport: Any = self.transport
            conf = self.app.conf
            self._probe = aiokafka.AIOKafkaConsumer(
                bootstrap_servers=aiokafka_driver.server_list(
                    transport.url, transport.default_port
                ),
                group_id=None,
                enable_auto_commit=False,
                client_id=f"{conf.broker_client_id}-offset-probe",
                **aiokafka_driver.credentials_to_aiokafka_auth(
                    conf.broker_credentials, conf.ssl_context
                ),
            )
            await self._probe.start()
        return self._probe


async def _seek(consumer: Any, tp: Any, offset: int) -> None:
    consumer.seek(tp, offset)


def _kafka_tp(tp: TP) -> Any:
    return aiokafka.TopicPartition(tp.topic, tp.partition)
