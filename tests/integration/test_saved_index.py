"""A saved similarity index is loaded only onto the topic it read (through the broker): the
start tells a recreated or shorter topic from the one the save left, by the partitions, their
ends and the record the save read last."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from classify_app.dev.broker import LocalBroker
from tables.similarity import IndexFeeder, Position, SimilarityIndex

TOPIC = "vectors"


async def filled(bootstrap: str, records: int) -> list[Any]:
    """A two-partition topic with `records` records in partition 0; their metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(TOPIC, b"{}", key=f"ad-{n}".encode(), partition=0)
            for n in range(records)
        ]
    finally:
        await producer.stop()
    return sent


async def misfit(bootstrap: str, saved: dict[int, Position]) -> str | None:
    feeder = IndexFeeder(SimilarityIndex(4), topic=TOPIC, bootstrap=bootstrap, options={})
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
        consumer.assign(assigned)
        return await feeder._misfit(consumer, saved, await consumer.end_offsets(assigned))
    finally:
        await consumer.stop()


async def test_a_save_fits_only_the_topic_it_read(broker: LocalBroker) -> None:
    sent = await filled(broker.bootstrap, 3)
    last = sent[-1]
    assert (last.offset, last.timestamp > 0) == (2, True)
    # What the save read: all of partition 0, nothing of partition 1.
    assert await misfit(broker.bootstrap, {0: (3, last.timestamp), 1: (0, -1)}) is None
    assert await misfit(broker.bootstrap, {0: (2, sent[1].timestamp)}) is None  # behind: fine
    # A topic of the same name made again: the record the save read last is another.
    changed = await misfit(broker.bootstrap, {0: (3, last.timestamp - 1)})
    assert changed == "the record at offset 2 of partition 0 changed"
    shorter = await misfit(broker.bootstrap, {0: (5, last.timestamp)})
    assert shorter == "partition 0 ends at 3, the save read 5"
    assert await misfit(broker.bootstrap, {7: (1, 0)}) == "partition 7 is gone"
