"""Fixtures for the stages run in-process: each test builds its own worker parts from its own
settings, around the session's loaded model, and a local server of sample and broken images."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from classify_app.dev.images import SampleImageServer
from classify_app.dev.processes import LOOPBACK_NETS
from classify_app.settings import Settings
from classify_app.worker import WorkerParts
from models import ImageModel


@pytest.fixture()
def settings() -> Settings:
    """A worker's settings for in-process tests: no MongoDB, the image server reachable."""
    return Settings(
        profile="local",
        mongo_uri="",
        download_allow_nets=LOOPBACK_NETS,
        download_timeout_s=2.0,
        download_max_bytes=2_000_000,
        decode_threads=1,
    )


@pytest.fixture()
async def parts(settings: Settings, loaded_model: ImageModel) -> AsyncIterator[WorkerParts]:
    """The worker's parts for `settings`, in the test's event loop."""
    built = WorkerParts(settings, model=loaded_model)
    yield built
    await built.on_stop()


@pytest.fixture()
async def image_server() -> AsyncIterator[SampleImageServer]:
    """Sample photos and broken answers on a loopback port, in the test's event loop."""
    server = SampleImageServer()
    await server.start()
    yield server
    await server.stop()
