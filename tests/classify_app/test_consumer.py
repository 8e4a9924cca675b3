"""The fixed consumer's commit rule on synthetic offsets: it never commits past an event that
was not handled, it finds holes, and it ignores acknowledgements of events a stream skipped."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
from faust.types import TP, Message
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from classify_app.consumer import Consumer, ReadOffsets
from classify_app.settings import Settings
from classify_app.worker import STREAM_BUFFER, ClassifyApp, faust_options

ADS = TP("ads", 0)


@pytest.fixture()
def app() -> ClassifyApp:
    built = ClassifyApp(Settings(profile="local", mongo_uri=""))
    built.finalize()
    # What subscribing an agent to `ads` does (Faust's conductor acks only such topics).
    built.topics._acking_topics.add(ADS.topic)  # type: ignore[attr-defined]
    built.flow_control.resume()
    return built


@pytest.fixture()
def consumer(app: ClassifyApp) -> Iterator[Consumer]:
    made = app._new_consumer()
    assert isinstance(made, Consumer)
    yield made


def message(app: ClassifyApp, offset: int, *, generation: int | None = None) -> Message:
    return Message(
        ADS.topic,
        ADS.partition,
        offset,
        0.0,
        0,
        None,
        b"key",
        b"value",
        None,
        generation_id=app.consumer_generation_id if generation is None else generation,
    )


def ack(app: ClassifyApp, consumer: Consumer, *offsets: int) -> None:
    for offset in offsets:
        assert consumer.ack(message(app, offset))


def test_nothing_is_committed_past_the_event_at_the_committed_offset(
    app: ClassifyApp, consumer: Consumer
) -> None:
    consumer._committed_offset[ADS] = 10
    ack(app, consumer, 11, 12)
    assert consumer._new_offset(ADS) is None  # 10 is not done (Faust would commit 13)
    assert consumer.holes() == {ADS: 10}
    ack(app, consumer, 10)
    assert consumer._new_offset(ADS) == 13
    assert consumer.holes() == {}


def test_a_run_is_committed_up_to_its_first_gap(app: ClassifyApp, consumer: Consumer) -> None:
    consumer._committed_offset[ADS] = 0
    ack(app, consumer, 0, 1, 2, 5, 6)
    assert consumer._new_offset(ADS) == 3
    consumer._committed_offset[ADS] = 3
    assert consumer._new_offset(ADS) is None
    assert consumer.holes() == {ADS: 3}


def test_a_partition_never_committed_commits_from_its_first_offset(
    app: ClassifyApp, consumer: Consumer
) -> None:
    assert consumer._committed_offset[ADS] is None
    ack(app, consumer, 5, 6)
    assert consumer._new_offset(ADS) is None  # where the partition starts is not known yet
    consumer._start_offset[ADS] = 4  # (learnt from the broker: the first offset it has)
    assert consumer._new_offset(ADS) is None  # 4 is not done: Faust would commit 7
    assert consumer.holes() == {ADS: 4}
    ack(app, consumer, 4)
    assert consumer._new_offset(ADS) == 7


def test_offsets_the_broker_does_not_have_are_passed_over(
    app: ClassifyApp, consumer: Consumer
) -> None:
    consumer._committed_offset[ADS] = 10
    ack(app, consumer, 12, 13)
    consumer.pass_over(ADS, [10, 11])  # a transaction marker, a compacted record
    assert consumer._new_offset(ADS) == 14
    assert consumer.holes() == {}


def test_a_rewind_is_not_undone_by_the_batch_being_delivered() -> None:
    offsets = ReadOffsets()
    assert offsets[ADS] is None
    offsets[ADS] = 20  # delivered up to 20
    offsets.rewind(ADS, 12)  # 12 was dropped: fetch again from there
    assert offsets[ADS] == 12
    offsets[ADS] = 21  # the rest of the batch fetched before the rewind
    assert offsets[ADS] == 12  # ...would have made the drain loop drop 12..20 again
    offsets[ADS] = 12  # the record at 12, fetched again
    offsets[ADS] = 13
    assert offsets[ADS] == 13 and offsets.floors == {}
    offsets.rewind(ADS, 5)
    offsets.update({ADS: 30})  # a rebalance's seek to the committed offsets wins
    assert offsets[ADS] == 30 and offsets.floors == {}


async def test_an_offset_jump_acknowledges_nothing(app: ClassifyApp, consumer: Consumer) -> None:
    consumer._committed_offset[ADS] = 4
    await consumer._add_gap(ADS, 4, 9)
    assert consumer._acked[ADS] == []
    assert consumer._new_offset(ADS) is None


def test_an_event_of_an_earlier_generation_is_released_not_acknowledged(
    app: ClassifyApp, consumer: Consumer
) -> None:
    consumer._committed_offset[ADS] = 0
    stale = message(app, 0, generation=app.consumer_generation_id - 1)
    consumer._unacked_messages.add(stale)
    assert consumer.ack(stale) is False
    assert stale.acked and stale not in consumer._unacked_messages  # shutdown need not wait
    assert consumer._acked[ADS] == [] and consumer._new_offset(ADS) is None


def test_events_handled_during_a_rebalance_are_not_acknowledged(
    app: ClassifyApp, consumer: Consumer
) -> None:
    consumer._committed_offset[ADS] = 0
    app.flow_control.suspend()  # partitions are being revoked and reassigned
    assert consumer.ack(message(app, 0)) is False
    app.flow_control.resume()
    assert consumer._new_offset(ADS) is None
    ack(app, consumer, 0)
    assert consumer._new_offset(ADS) == 1


def test_a_full_stream_buffer_stops_fetching_its_whole_topic(consumer: Consumer) -> None:
    # Partitions of one topic share a stream buffer: fetching the others would fill it anyway,
    # and their polls would wait there with the records of every other topic behind them.
    ads = {TP("ads", partition) for partition in range(4)}
    outcomes = TP("classify-outcomes", 0)
    consumer._active_partitions = {*ads, outcomes}
    consumer.on_buffer_full(TP("ads", 2))
    assert consumer._get_active_partitions() == {outcomes}
    consumer.on_buffer_drop(TP("ads", 2))  # the drop the buffer holds for it
    assert consumer._get_active_partitions() == {*ads, outcomes}
    assert not consumer._buffered_partitions


def test_a_partition_waiting_for_its_own_drop_stays_paused_until_it_comes(
    consumer: Consumer,
) -> None:
    # Records of ads-1 still in the poll found the buffer full too: the buffer holds a drop for
    # each, and while ads-1's is pending its records cannot say the buffer is full again.
    ads = [TP("ads", partition) for partition in range(3)]
    consumer._active_partitions = set(ads)
    consumer.on_buffer_full(ads[0])
    consumer.on_buffer_full(ads[1])
    consumer.on_buffer_drop(ads[0])
    assert consumer._get_active_partitions() == {ads[0], ads[2]}
    consumer.on_buffer_drop(ads[1])
    assert consumer._get_active_partitions() == set(ads)


def test_a_topic_paused_by_mode_s_stream_buffer_is_fetched_again_as_it_drains(
    consumer: Consumer,
) -> None:
    # The buffer Faust's streams read from, with the callbacks its conductor gives each
    # partition: the drops come one per read once the buffer is down to 2/5.
    buffer: ThrowableQueue[TP] = ThrowableQueue(
        maxsize=STREAM_BUFFER, flow_control=FlowControlEvent()
    )
    ads = [TP("ads", partition) for partition in range(2)]
    consumer._active_partitions = set(ads)
    callbacks = {
        tp: (partial(consumer.on_buffer_full, tp), partial(consumer.on_buffer_drop, tp))
        for tp in ads
    }

    def put(tp: TP) -> None:
        full, drop = callbacks[tp]
        buffer.put_nowait_enhanced(tp, on_pressure_high=full, on_pressure_drop=drop)

    for _ in range(buffer.pressure_high_size + 1):
        put(ads[0])
    put(ads[1])  # the rest of the poll: it finds the buffer full too
    assert consumer._get_active_partitions() == set()
    while buffer.qsize() > buffer.pressure_drop_size:
        buffer.get_nowait()
    buffer.get_nowait()
    assert len(consumer._get_active_partitions()) == 1  # the other still waits for its drop
    buffer.get_nowait()
    assert consumer._get_active_partitions() == set(ads)


def test_a_drop_does_not_resume_what_a_rebalance_paused(consumer: Consumer) -> None:
    ads = [TP("ads", partition) for partition in range(2)]
    consumer._active_partitions = set(ads)
    consumer.on_buffer_full(ads[0])
    consumer.pause_partitions({ads[1]})
    consumer.on_buffer_drop(ads[0])
    assert consumer._get_active_partitions() == {ads[0]}
    consumer.resume_partitions({ads[1]})
    assert consumer._get_active_partitions() == set(ads)


def test_a_poll_fits_in_a_stream_buffer_above_its_high_mark() -> None:
    # A poll larger than what a buffer holds past the mark where fetching stops waits on the
    # full buffer, and every other topic's records behind it.
    options = faust_options(Settings(profile="local", mongo_uri=""))
    buffer = options["stream_buffer_maxsize"]
    assert options["broker_max_poll_records"] <= buffer - buffer / 1.25
