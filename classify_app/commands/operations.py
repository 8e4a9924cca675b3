"""Operator commands: apply MongoDB migrations, replay the dead-letter topic.

Kept out of the worker: an operator runs them, `dlq-replay` once the cause of the failures is
fixed. The replay uses plain aiokafka.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.cli import AppCommand, option

from classify_app.application import app
from classify_app.commands import bootstrap_servers, fail
from classify_app.records import DeadLetter
from classify_app.vocabulary import EventReason
from classify_app.worker import create_store_from
from tables.migrations import MIGRATIONS, pending
from tables.migrations import migrate as apply_migrations


def replay_group(app_id: str, reason: str | None) -> str:
    """The consumer group that remembers how far replays of `reason` (None: all) have got."""
    group = f"{app_id}-dlq-replay"
    return group if reason is None else f"{group}.{reason}"


def original_payload(letter: DeadLetter) -> bytes:
    """The bytes of the event as it was first published."""
    if letter.payload.startswith("base64:"):
        return base64.b64decode(letter.payload[len("base64:") :])
    return letter.payload.encode("utf-8")


async def replayed_up_to(
    bootstrap: str, topic: str, app_id: str, options: dict[str, Any]
) -> dict[str, dict[int, int]]:
    """For each replay group, the offset of each dead-letter partition it has replayed to."""
    positions: dict[str, dict[int, int]] = {}
    groups = [replay_group(app_id, None), *(replay_group(app_id, r) for r in EventReason)]
    for group in groups:
        # A consumer of the group, never subscribed, only to read its committed offsets
        # (Tansu does not answer the admin client's form of the same request).
        reader = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **options
        )
        await reader.start()
        try:
            partitions = sorted(reader.partitions_for_topic(topic) or [])
            if not partitions:
                await reader.topics()
                partitions = sorted(reader.partitions_for_topic(topic) or [])
            positions[group] = {}
            for number in partitions:
                committed = await reader.committed(TopicPartition(topic, number))
                if committed is not None and committed >= 0:
                    positions[group][number] = committed
        finally:
            await reader.stop()
    return positions


async def replay_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    reason: str | None = None,
    limit: int = 0,
    dry_run: bool = False,
    app_id: str = "classify-app",
    options: dict[str, Any] | None = None,
) -> tuple[list[DeadLetter], int]:
    """Publish the dead letters not replayed yet (matching `reason`) to their original topics;
    returns the ones replayed (or, with `dry_run`, that would be) and how many were skipped.

    A replay of one reason has its own consumer group, so it never moves the position of
    another: a letter counts as replayed once the group of all reasons or the group of its
    own reason has passed it. A letter whose payload was cut (`payload_truncated`) cannot be
    replayed and is skipped.
    """
    options = options or {}
    done = await replayed_up_to(bootstrap, topic, app_id, options)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=replay_group(app_id, reason),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
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
                    already = max(
                        done[replay_group(app_id, None)].get(tp.partition, -1),
                        done.get(replay_group(app_id, letter.reason), {}).get(tp.partition, -1),
                    )
                    if (
                        (reason is not None and letter.reason != reason)
                        or record.offset < already
                        or letter.payload_truncated
                    ):
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


@app.command()
async def migrate(self: AppCommand) -> None:
    """Apply the pending MongoDB schema migrations, each exactly once (safe to run anywhere,
    any number of times, also while workers start)."""
    store = create_store_from(app.settings)
    if store is None:
        fail(self, "CLASSIFY_MONGO_URI is empty: this deployment has no MongoDB store")
    try:
        waiting = await pending(store)
        ran = await apply_migrations(store)
        for migration in ran:
            self.say(f"applied {migration.version}: {migration.name}")
        skipped = len(waiting) - len(ran)
        self.say(
            f"{len(ran)} migrations applied"
            + (f", {skipped} applied by another runner meanwhile" if skipped > 0 else "")
            + f"; schema at version {max(m.version for m in MIGRATIONS)}"
        )
    finally:
        await store.close()


@app.command(
    option("--reason", default=None, help="Replay only dead letters with this reason code."),
    option("--limit", type=int, default=0, help="Replay at most this many (0: all)."),
    option("--dry-run", is_flag=True, default=False, help="List them, publish nothing."),
)
async def dlq_replay(self: AppCommand, reason: str | None, limit: int, dry_run: bool) -> None:
    """Re-publish dead-lettered events to the topics they came from.

    Reads the dead-letter topic from where the last replay stopped (consumer group
    `<app id>-dlq-replay`, one per reason with --reason) up to its current end, publishes
    each payload again with its original key, and commits, so running it twice does not
    replay twice. Fix the cause first
    (a producer bug, a MongoDB conflict): an event that still fails is dead-lettered again.
    """
    replayed, skipped = await replay_dead_letters(
        bootstrap_servers(),
        app.settings.dead_letter_topic,
        reason=reason,
        limit=limit,
        dry_run=dry_run,
    )
    for letter in replayed:
        self.say(
            f"{'would replay' if dry_run else 'replayed'} {letter.reason}: "
            f"{letter.topic}[{letter.partition}]@{letter.offset}"
        )
    self.say(
        f"{len(replayed)} dead letters {'to replay' if dry_run else 'replayed'}, {skipped} skipped"
    )
