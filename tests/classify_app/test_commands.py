"""The operator commands, run as an operator would: `faust -A classify_app <command>`."""

from __future__ import annotations

import os
import subprocess
import sys

from classify_app.dev.mongo import LocalMongo
from tables.migrations import MIGRATIONS, pending
from tests.support.records import new_store


def faust(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "classify_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_migrate_applies_the_schema_once(mongo: LocalMongo, mongo_database: str) -> None:

    env = {
        **os.environ,
        "CLASSIFY_MONGO_URI": mongo.uri,
        "CLASSIFY_MONGO_DATABASE": mongo_database,
    }
    first = faust("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert f"{len(MIGRATIONS)} migrations applied" in first.stdout
    second = faust("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert "0 migrations applied" in second.stdout
    store = new_store(mongo.uri, mongo_database)
    try:
        assert await pending(store) == []
    finally:
        await store.close()


def test_migrate_without_a_store_says_why() -> None:

    result = faust("migrate", env={**os.environ, "CLASSIFY_MONGO_URI": ""})
    assert result.returncode != 0
    assert "CLASSIFY_MONGO_URI is empty" in result.stdout + result.stderr
