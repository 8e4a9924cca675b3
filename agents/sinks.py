"""Where a stage's records go: a `Sink` (a Faust topic in the worker, a recorder in tests) and
the dead-letter sink, which keeps every event a stage could not process with why and its payload.

Stages call `DeadLetters.send` instead of dropping an event; the event's offset may then be
committed, because the dead letter holds everything needed to replay it.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Protocol

import faust
from faust.types import EventT

from classify_app.metrics import Metrics
from classify_app.records import DeadLetter

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Takes a stage's output records; `faust.types.TopicT` is one."""

    async def send(self, *, key: Any = None, value: Any = None) -> Any:
        """Send one record; raises if it cannot be handed to the producer."""


class DeadLetters:
    """The dead-letter topic seen by a stage: each letter counted in the metrics and logged."""

    def __init__(self, sink: Sink, metrics: Metrics) -> None:
        self.sink = sink
        self.metrics = metrics

    async def send(self, event: EventT, reason: str, message: str) -> None:
        """Keep an event that could not be processed, with the reason and its payload."""
        source = event.message
        await self.sink.send(
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
        self.metrics.dead_lettered(reason)
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
