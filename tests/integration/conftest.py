"""Integration fixtures: a real Tansu broker, real worker processes, a real image server, and
a real MongoDB-protocol server (each test's workers write to their own database)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from classify_app.dev.broker import LocalBroker, running_broker
from classify_app.dev.images import SampleImageServer, serving_images
from classify_app.dev.mongo import LocalMongo
from tests.support.workers import Worker

pytestmark = pytest.mark.integration


@pytest.fixture()
def broker() -> Iterator[LocalBroker]:
    with running_broker() as started:
        yield started


@pytest.fixture(scope="session")
def images() -> Iterator[SampleImageServer]:
    with serving_images() as server:
        yield server


@pytest.fixture()
def workers(
    broker: LocalBroker, tmp_path: Path, mongo: LocalMongo, mongo_database: str
) -> Iterator[Callable[..., Worker]]:
    """Worker processes a test starts; all are stopped at the end. Each has its own data dir
    (restart one with `start()` again); they share a MongoDB database (the session's server
    unless `mongo_uri` names another). `env` adds `CLASSIFY_*` settings."""
    started: list[Worker] = []

    def make(mongo_uri: str | None = None, env: dict[str, str] | None = None) -> Worker:
        worker = Worker(
            broker,
            tmp_path / f"data-{len(started)}",
            tmp_path / f"worker-{len(started)}.log",
            mongo_uri or mongo.uri,
            mongo_database,
            env,
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()
