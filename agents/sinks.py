"""Where a stage's records go: a `Sink` (a Faust topic in the worker, a recorder in tests),
`deliver`, which returns only once the broker has a record, and the dead-letter sink, which
keeps every event a stage could not process with why and its payload.

Stages call `DeadLetters.send` instead of dropping an event; the event's offset may then be
committed, because the dead letter holds everything needed to replay it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import time
from typing import Any, Protocol

import faust
from faust.types import EventT

from agents.acks import LeaveUnacknowledged
from classify_app.metrics import Metrics
from classify_app.records import (
    MAX_DEAD_LETTER_KEY,
    MAX_DEAD_LETTER_MESSAGE,
    MAX_DEAD_LETTER_PAYLOAD,
    DeadLetter,
)

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Takes a stage's output records; `faust.types.TopicT` is one."""

    async def send(self, *, key: Any = None, value: Any = None) -> Any:
        """Send one record; raises if it cannot be handed to the producer."""


class NotDelivered(LeaveUnacknowledged):
    """A record the broker did not take: the event that caused it is processed again."""


async def deliver(sink: Sink, *, key: Any, value: Any, timeout: float | None = None) -> None:
    """Send a record and return once the broker has it (Faust's `send` only queues it), or
    raise `NotDelivered` (also after `timeout` seconds), so that the event that caused the
    record is not acknowledged."""
    try:
        async with asyncio.timeout(timeout):
            pending = await sink.send(key=key, value=value)
            if inspect.isawaitable(pending):
                await pending
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise NotDelivered(f"{type(value).__name__} not delivered: {exc!r}") from exc


class DeadLetters:
    """The dead-letter topic seen by one stage: each letter bounded, counted and logged."""

    def __init__(self, sink: Sink, metrics: Metrics, stage: str) -> None:
        self.sink = sink
        self.metrics = metrics
        self.stage = stage

    async def send(self, event: EventT, reason: str, message: str) -> None:
        """Keep an event that could not be processed, with the reason and its payload."""
        source = event.message
        payload = _payload_bytes(event.value)
        raw_key = _payload_bytes(source.key) if source.key is not None else None
        key = None if raw_key is None else _text(raw_key, MAX_DEAD_LETTER_KEY)
        await deliver(
            self.sink,
            # The letter's own key: the original one, when it is of a sane size.
            key=raw_key if raw_key is not None and len(raw_key) <= MAX_DEAD_LETTER_KEY else None,
            value=DeadLetter(
                reason=reason,
                message=message[:MAX_DEAD_LETTER_MESSAGE],
                topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                payload=_text(payload, MAX_DEAD_LETTER_PAYLOAD),
                failed_at=time.time(),
                stage=self.stage,
                key=key,
                payload_bytes=len(payload),
                payload_sha256=hashlib.sha256(payload).hexdigest(),
                payload_truncated=len(payload) > MAX_DEAD_LETTER_PAYLOAD,
            ),
        )
        self.metrics.dead_lettered(reason)
        log.warning(
            "Dead-lettered event at %s:%s: %s",
            source.tp,
            source.offset,
            message[:MAX_DEAD_LETTER_MESSAGE],
            extra={"stage": self.stage, "reason": reason},
        )


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, faust.Record):
        payload = payload.dumps()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    return payload if isinstance(payload, bytes) else str(payload).encode()


def _text(data: bytes, limit: int) -> str:
    """The first `limit` bytes as text, or as `base64:...` when they are not UTF-8."""
    head = data[:limit]
    # A cut inside a UTF-8 character leaves at most 3 of its bytes behind.
    for cut in range(4 if len(data) > limit else 1):
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return "base64:" + base64.b64encode(head).decode("ascii")
