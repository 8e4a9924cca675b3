"""Fixtures for the stages run in-process with Faust's `test_context()` (no broker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from classify_app.application import app
from classify_app.local import SampleImageServer
from classify_app.topics import dead_letter_topic, image_outcomes_topic


class SentMessages:
    """What the stage under test sent, per topic, in order."""

    def __init__(self) -> None:
        self.by_topic: dict[str, list[tuple[Any, Any]]] = {}

    def values(self, topic: Any) -> list[Any]:
        return [value for _, value in self.by_topic.get(topic.get_topic_name(), [])]

    async def wait_for(self, total: int, timeout: float = 10.0) -> None:
        """Wait until `total` messages were sent in all (a stage sends after `put` returns)."""
        async with asyncio.timeout(timeout):
            while sum(map(len, self.by_topic.values())) < total:
                await asyncio.sleep(0.01)


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> SentMessages:
    """Records the sends to the internal and dead-letter topics instead of producing them."""
    record = SentMessages()
    for topic in (image_outcomes_topic, dead_letter_topic):

        async def send(
            *, key: Any = None, value: Any = None, _name: str = topic.get_topic_name(), **_: Any
        ) -> None:
            record.by_topic.setdefault(_name, []).append((key, value))

        monkeypatch.setattr(topic, "send", send)
    return record


@pytest.fixture()
def faust_app() -> Any:
    """The app, finalized for in-memory tests, as Faust's testing guide does it."""
    app.finalize()
    app.flow_control.resume()
    return app


@pytest.fixture()
async def image_server() -> AsyncIterator[SampleImageServer]:
    """Sample photos and broken answers on a loopback port, in the test's event loop."""
    server = SampleImageServer()
    await server.start()
    yield server
    await server.stop()
