"""Shared fixtures. Settings are read when `classify_app` is imported, so the environment for
in-process tests (Faust's `test_context()`, no broker, no MongoDB) is set here, before any test
imports it. Tests of the MongoDB store get a real MongoDB-protocol server (SecantusDB).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

os.environ.setdefault("CLASSIFY_STORE", "memory://")
os.environ.setdefault("CLASSIFY_DATADIR", tempfile.mkdtemp(prefix="classify-unit-"))
os.environ.setdefault("CLASSIFY_PROFILE", "local")
os.environ.setdefault("CLASSIFY_MONGO_URI", "")
os.environ.setdefault("CLASSIFY_DOWNLOAD_ALLOW_NETS", "127.0.0.0/8,::1/128")

from classify_app.local import LocalMongo, running_mongo
from tables.store import ResultStore


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


def new_store(uri: str, database: str) -> ResultStore:
    """Another client on the same database (as a second worker would have)."""
    return ResultStore(uri, database, "ad_results", timeout_s=5)
