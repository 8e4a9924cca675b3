"""Replaying the dead-letter topic (`faust -A classify_app dlq-replay`), with plain aiokafka.

Kept out of the worker: an operator runs it once the cause of the failures is fixed.
"""

from __future__ import annotations

import base64
import json

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from classify_app.records import DeadLetter

REPLAY_GROUP = "classify-app-dlq-replay"


def original_payload(letter: DeadLetter) -> bytes:
    """The bytes of the event as it was first published."""
    if letter.payload.startswith("base64:"):
        return base64.b64decode(letter.payload[len("base64:") :])
    return letter.payload.encode("utf-8")


async def replay_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    reason: str | None = None,
    limit: int = 0,
    dry_run: bool = False,
) -> tuple[list[DeadLetter], int]:
    """Publish the dead letters not replayed yet (matching `reason`) to their original topics;
    returns the ones replayed (or, with `dry_run`, that would be) and how many were skipped."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=REPLAY_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    replayed: list[DeadLetter] = []
    skipped = 0
    try:
        await consumer.topics()  # fetches the cluster's metadata
        partitions = [
            TopicPartition(topic, number)
            for number in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        if not partitions:
            return [], 0
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        while pending and not (limit and len(replayed) >= limit):
            batches = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp] or (limit and len(replayed) >= limit):
                        pending.discard(tp)
                        break
                    letter = DeadLetter.from_data(json.loads(record.value))
                    if reason is not None and letter.reason != reason:
                        skipped += 1
                    else:
                        if not dry_run:
                            await producer.send_and_wait(
                                letter.topic, original_payload(letter), key=record.key
                            )
                        replayed.append(letter)
                    if not dry_run:
                        await consumer.commit({tp: record.offset + 1})
                    if record.offset + 1 >= ends[tp]:
                        pending.discard(tp)
    finally:
        await producer.stop()
        await consumer.stop()
    return replayed, skipped
