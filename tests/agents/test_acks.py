"""Events handled concurrently are acknowledged in offset order, per partition."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from faust.types import TP

from agents.acks import InOrderAcks, LeaveUnacknowledged


@dataclass
class Message:
    tp: TP
    offset: int


@dataclass
class Event:
    message: Message


class RecordingStream:
    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    async def ack(self, event: Event) -> bool:
        self.acked.append((event.message.tp.partition, event.message.offset))
        return True


async def test_acks_follow_offsets_even_when_handlers_finish_out_of_order() -> None:
    stream = RecordingStream()
    acks = InOrderAcks(stream, limit=10)  # type: ignore[arg-type]
    finish = {offset: asyncio.Event() for offset in range(4)}

    async def handler(offset: int) -> None:
        await finish[offset].wait()

    for partition in (0, 1):
        for offset in range(4) if partition == 0 else range(2):
            event = Event(Message(TP("ads", partition), offset))
            await acks.submit(event, handler(offset))  # type: ignore[arg-type]
    for offset in (3, 2, 1):
        finish[offset].set()
        await asyncio.sleep(0.01)
    assert stream.acked == []  # both partitions still wait for their offset 0
    finish[0].set()
    await acks.drain()
    assert [offset for partition, offset in stream.acked if partition == 0] == [0, 1, 2, 3]
    assert [offset for partition, offset in stream.acked if partition == 1] == [0, 1]


async def test_a_failing_handler_is_logged_and_acked_in_its_turn() -> None:
    stream = RecordingStream()
    acks = InOrderAcks(stream, limit=2)  # type: ignore[arg-type]

    async def broken() -> None:
        raise RuntimeError("bug")

    async def fine() -> None:
        await asyncio.sleep(0.01)

    await acks.submit(Event(Message(TP("ads", 0), 0)), broken())  # type: ignore[arg-type]
    await acks.submit(Event(Message(TP("ads", 0), 1)), fine())  # type: ignore[arg-type]
    await acks.drain()
    assert stream.acked == [(0, 0), (0, 1)]


async def test_no_more_than_limit_handlers_run_at_once() -> None:
    stream = RecordingStream()
    acks = InOrderAcks(stream, limit=3)  # type: ignore[arg-type]
    running = 0
    most = 0

    async def handler() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1

    for offset in range(12):
        await acks.submit(Event(Message(TP("ads", 0), offset)), handler())  # type: ignore[arg-type]
    await acks.drain()
    assert most == 3
    assert [offset for _, offset in stream.acked] == list(range(12))


async def test_an_event_left_unacknowledged_or_cancelled_is_not_acked() -> None:
    stream = RecordingStream()
    acks = InOrderAcks(stream, limit=3)  # type: ignore[arg-type]

    async def unavailable() -> None:
        raise LeaveUnacknowledged("the model cannot load")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def fine() -> None:
        await asyncio.sleep(0.01)

    await acks.submit(Event(Message(TP("ads", 0), 0)), unavailable())  # type: ignore[arg-type]
    await acks.submit(Event(Message(TP("ads", 0), 1)), fine())  # type: ignore[arg-type]
    await acks.submit(Event(Message(TP("ads", 0), 2)), forever())  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    for task in list(acks._tasks):
        task.cancel()
    await acks.drain()
    # Offset 1 is acked; the consumer still commits nothing past the missing offset 0.
    assert stream.acked == [(0, 1)]
