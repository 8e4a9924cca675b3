"""Shared fixtures: a real MongoDB-protocol server (SecantusDB) for the store's tests, and one
loaded model for the tests that classify in-process (each builds its own parts around it from
its own `Settings`; nothing here depends on the environment).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from classify_app.dev.mongo import LocalMongo, running_mongo
from models import ImageModel, create_model
from tables.store import ResultStore


@pytest.fixture(scope="session")
def loaded_model() -> ImageModel:
    """The default model on the CPU, loaded once for the session (it is thread-safe)."""
    model = create_model("efficientnet-lite0", device="cpu")
    model.load()
    return model


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMongo]:
    """One SecantusDB server for the session; each test uses its own database."""
    with running_mongo(tmp_path_factory.mktemp("mongo") / "data") as server:
        yield server


@pytest.fixture()
def mongo_database() -> str:
    """A database name no other test uses."""
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture()
async def store(mongo: LocalMongo, mongo_database: str) -> AsyncIterator[ResultStore]:
    """A `ResultStore` on a fresh database of the session's server."""
    result_store = ResultStore(mongo.uri, mongo_database, "ad_results", timeout_s=5)
    yield result_store
    await result_store.close()
