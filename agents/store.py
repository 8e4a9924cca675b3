"""Stage 4: `results` -> the MongoDB store of record (absent in a table-only deployment).

Each finished result is handed to the store writer (`tables/writer.py`), which writes in bulk
and retries while MongoDB is down; the event is acknowledged only once its result is stored,
so a crash or a rebalance replays it (the upsert is idempotent). A result MongoDB refuses for
good (its catalog key belongs to another ad) goes to the dead-letter topic with the reason.
"""

from __future__ import annotations

import functools
from typing import Any

from faust.types import EventT, StreamT

from agents.sinks import DeadLetters
from classify_app.application import app
from classify_app.topics import dead_letter_topic, results_topic
from classify_app.vocabulary import EventReason
from tables.writer import Done


def _settled(stream: StreamT, event: EventT, dead_letters: DeadLetters) -> Done:
    async def done(rejected: str | None) -> None:
        if rejected is not None:
            await dead_letters.send(event, EventReason.STORE_REJECTED, rejected)
        await stream.ack(event)

    return done


async def store_results(stream: StreamT) -> None:
    """Buffer every result for the writer; acks follow the writes, in offset order."""
    writer = app.parts.writer
    assert writer is not None, "registered only when there is a store"
    dead_letters = DeadLetters(dead_letter_topic, app.parts.metrics, stage="store")
    unacked: Any = stream.noack()  # type: ignore[attr-defined]
    consumer: Any = app.consumer
    writer.start()
    # Before a rebalance waits for every fetched event to be acknowledged: what waits on
    # MongoDB is handed back to be replayed by the next owner, instead of holding the group.
    app.before_streams_drain.append(writer.give_back)
    try:
        async for event in unacked.events():
            await writer.put(
                event.value,
                _settled(unacked, event, dead_letters),
                give_back=functools.partial(consumer.release, event.message),
            )
    finally:
        app.before_streams_drain.remove(writer.give_back)
        await writer.stop()


if app.settings.mongo_enabled:  # a table-only deployment does not consume `results`
    app.agent(results_topic)(store_results)
