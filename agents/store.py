"""Stage 4: `results` -> the MongoDB store of record (absent in a table-only deployment).

Each finished result is handed to the store writer (`tables/writer.py`), which writes in bulk
and retries while MongoDB is down; the event is acknowledged only once its result is stored,
so a crash or a rebalance replays it (the upsert is idempotent). A result MongoDB refuses for
good (its catalog key belongs to another ad) goes to the dead-letter topic with the reason.
"""

from __future__ import annotations

from typing import Any, cast

from faust.types import EventT, StreamT

from agents.dead_letters import dead_letter
from classify_app.application import app, store_writer
from classify_app.topics import results_topic
from tables.writer import Done, ResultWriter


def _settled(stream: StreamT, event: EventT) -> Done:
    async def done(rejected: str | None) -> None:
        if rejected is not None:
            await dead_letter(event, "store_rejected", rejected)
        await stream.ack(event)

    return done


async def store_results(stream: Any) -> None:
    """Buffer every result for the writer; acks follow the writes, in offset order."""
    writer = cast(ResultWriter, store_writer)  # registered below only when there is a store
    unacked = stream.noack()
    writer.start()
    try:
        async for event in unacked.events():
            await writer.put(event.value, _settled(unacked, event))
    finally:
        await writer.stop()


if store_writer is not None:  # a table-only deployment does not consume `results`
    app.agent(results_topic)(store_results)
