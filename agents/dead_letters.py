"""The dead-letter topic: every event a stage could not process, with why and its payload.

Stages call `dead_letter` instead of dropping an event; the event's offset may then be
committed, because the dead letter holds everything needed to replay it.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import faust
from faust.types import EventT

from classify_app.application import metrics
from classify_app.records import DeadLetter
from classify_app.topics import dead_letter_topic

log = logging.getLogger(__name__)


async def dead_letter(event: EventT, reason: str, message: str) -> None:
    """Keep an event that could not be processed, with the reason and its original payload."""
    source = event.message
    await dead_letter_topic.send(
        key=source.key,
        value=DeadLetter(
            reason=reason,
            message=message,
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            payload=_printable(event.value),
            failed_at=time.time(),
        ),
    )
    metrics.dead_lettered(reason)
    log.warning(
        "Dead-lettered event at %s:%s: %s",
        source.tp,
        source.offset,
        message,
        extra={"stage": source.topic, "reason": reason},
    )


def _printable(payload: Any) -> str:
    """The original payload as text (a record as its JSON, bytes that are not UTF-8 as base64)."""
    if isinstance(payload, faust.Record):
        payload = payload.dumps()
    if isinstance(payload, bytes):
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(payload).decode("ascii")
    return str(payload)
