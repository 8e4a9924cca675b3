"""Versioned schema migrations of the MongoDB store, each applied exactly once.

The `migrations` collection holds one document per version. A runner claims a version by
inserting its document (the `_id` index lets one runner win), applies it while refreshing a
heartbeat, and marks it done; a runner that loses the claim waits for the winner instead of
applying it too. A runner that fails releases its claim; one that died stops its heartbeat and
is taken over after `CLAIM_LEASE_S`, so migrations must be safe to re-run (index creation is).

Run by `faust -A classify_app migrate` and, with `CLASSIFY_MONGO_MIGRATE_ON_START`, by the
worker before its first write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from classify_app.records import AdResult
from tables.store import ResultStore, order_key

log = logging.getLogger(__name__)

MIGRATIONS_COLLECTION = "migrations"
CLAIM_LEASE_S = 60.0
HEARTBEAT_S = 10.0
POLL_S = 0.2


@dataclass(frozen=True)
class Migration:
    """One schema change: `apply` must be idempotent (a dead runner's claim is re-run)."""

    version: int
    name: str
    apply: Callable[[ResultStore], Awaitable[None]]


async def _create_result_indexes(store: ResultStore) -> None:
    # By ad id is the `_id` index. The catalog key is unique: concurrent first writes for one
    # catalog ad cannot both insert.
    await store.results.create_indexes(
        [
            IndexModel(
                [("catalog_name", ASCENDING), ("catalog_ad_id", ASCENDING)],
                name="catalog_key",
                unique=True,
            ),
            IndexModel(
                [("category", ASCENDING), ("updated_at", DESCENDING)], name="category_recent"
            ),
        ]
    )


async def _create_status_index(store: ResultStore) -> None:
    # Operators look for the ads that failed or partly failed recently.
    await store.results.create_index(
        [("status", ASCENDING), ("updated_at", DESCENDING)], name="status_recent"
    )


async def _order_by_arrival(store: ResultStore) -> None:
    # Order keys gained the time the event was produced, between version and request id
    # (ties between two versions of one time went to the larger hash before). Rewritten in
    # bulks; a document already rewritten matches no more.
    old_format = {"order_key": {"$regex": r"^[^|]*\|[^|]*$"}}
    while True:
        documents = await store.results.find(old_format).limit(500).to_list()
        if not documents:
            return
        await store.results.bulk_write(
            [
                UpdateOne(
                    {"_id": document["_id"], "order_key": document["order_key"]},
                    {"$set": {"order_key": _order_key_of(document)}},
                )
                for document in documents
            ],
            ordered=False,
        )


def _order_key_of(document: dict[str, Any]) -> str:
    return order_key(
        AdResult(
            ad_id=document["_id"],
            request_id=document.get("request_id", ""),
            catalog_name="",
            catalog_ad_id="",
            status="",
            image_count=0,
            version=float(document.get("version") or 0.0),
            submitted_at=float(document.get("submitted_at") or 0.0),
        )
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "result indexes: catalog key (unique), category by time", _create_result_indexes),
    Migration(2, "result index: status by update time", _create_status_index),
    Migration(3, "order keys: version, then arrival, then request id", _order_by_arrival),
)


async def migrate(
    store: ResultStore, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[Migration]:
    """Apply every migration not yet recorded, in version order; returns the ones this call ran."""
    runner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ran: list[Migration] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if await _run_once(store, migration, runner):
            ran.append(migration)
    return ran


async def pending(store: ResultStore, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """The versions not yet applied."""
    done = {
        document["_id"]
        async for document in store.database[MIGRATIONS_COLLECTION].find({"state": "done"})
    }
    return [migration.version for migration in migrations if migration.version not in done]


async def _run_once(store: ResultStore, migration: Migration, runner: str) -> bool:
    records = store.database[MIGRATIONS_COLLECTION]
    while True:
        now = datetime.now(UTC)
        try:
            await records.insert_one(
                {
                    "_id": migration.version,
                    "name": migration.name,
                    "state": "running",
                    "runner": runner,
                    "started_at": now,
                    "heartbeat_at": now,
                }
            )
            break
        except DuplicateKeyError:
            pass
        record = await records.find_one({"_id": migration.version})
        if record is None:
            continue  # the claim vanished between the insert and the read
        if record["state"] == "done":
            return False
        taken_over = await records.find_one_and_update(
            {
                "_id": migration.version,
                "state": "running",
                "heartbeat_at": {"$lt": now - timedelta(seconds=CLAIM_LEASE_S)},
            },
            {"$set": {"runner": runner, "started_at": now, "heartbeat_at": now}},
        )
        if taken_over is not None:
            log.warning("Took over migration %d from %s", migration.version, record["runner"])
            break
        await asyncio.sleep(POLL_S)
    log.info("Applying migration %d: %s", migration.version, migration.name)
    claim = {"_id": migration.version, "runner": runner}
    heartbeat = asyncio.create_task(_beat(records, claim))
    try:
        await migration.apply(store)
    except BaseException:
        with contextlib.suppress(PyMongoError):
            await records.delete_one({**claim, "state": "running"})
        raise
    finally:
        heartbeat.cancel()
    await records.update_one(claim, {"$set": {"state": "done", "finished_at": datetime.now(UTC)}})
    return True


async def _beat(records: AsyncCollection[dict[str, Any]], claim: dict[str, Any]) -> None:
    """Keep a claim alive while its migration runs."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        with contextlib.suppress(PyMongoError):
            await records.update_one(claim, {"$set": {"heartbeat_at": datetime.now(UTC)}})
