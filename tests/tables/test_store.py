"""The MongoDB store against a real MongoDB-protocol server: idempotent, ordered, race-free
upserts, indexed lookups, and migrations that run once."""

from __future__ import annotations

import asyncio
from typing import Any

from classify_app.dev.mongo import LocalMongo
from tables.migrations import MIGRATIONS_COLLECTION, Migration, migrate, pending
from tables.store import ResultStore
from tests.support.records import finished, new_store


async def test_a_replayed_result_leaves_one_unchanged_document(store: ResultStore) -> None:
    await migrate(store)
    await store.upsert_many([finished()])
    first = await store.results.find_one({"_id": "ad-1"})
    report = await store.upsert_many([finished(), finished()])
    assert report.written == ["ad-1"]
    assert await store.results.count_documents({}) == 1
    again = await store.results.find_one({"_id": "ad-1"})
    assert first is not None and again is not None
    assert again["created_at"] == first["created_at"]
    assert {k: v for k, v in again.items() if k != "updated_at"} == {
        k: v for k, v in first.items() if k != "updated_at"
    }
    stored = await store.find("ad-1")
    assert stored is not None and stored.images[0].labels[0].name == "moped"


async def test_an_older_result_never_overwrites_a_newer_one(store: ResultStore) -> None:
    await migrate(store)
    newer = finished(version=200.0, request_id="r2", category="animals")
    older = finished(version=100.0, request_id="r1")
    await store.upsert_many([newer])
    report = await store.upsert_many([older])
    assert report.stale == ["ad-1"] and not report.written
    # In one bulk, in either order, the newer one is what stays.
    await store.upsert_many([newer, older])
    await store.upsert_many([older, newer])
    stored = await store.find("ad-1")
    assert stored is not None and stored.request_id == "r2" and stored.category == "animals"
    # Same version: the request id decides, as in the results table.
    tie = finished(version=200.0, request_id="r3", category="food_drink")
    await store.upsert_many([tie])
    stored = await store.find("ad-1")
    assert stored is not None and stored.request_id == "r3"


async def test_concurrent_first_writes_for_one_catalog_ad_make_one_document(
    store: ResultStore, mongo: LocalMongo, mongo_database: str
) -> None:
    await migrate(store)
    writers = [new_store(mongo.uri, mongo_database) for _ in range(8)]
    results = [finished(version=100.0 + n % 3, request_id=f"r{n}") for n in range(40)]
    try:
        reports = await asyncio.gather(
            *(writers[n % len(writers)].upsert_many([result]) for n, result in enumerate(results))
        )
    finally:
        await asyncio.gather(*(writer.close() for writer in writers))
    assert not any(report.rejected for report in reports)
    assert sum(len(r.written) + len(r.stale) for r in reports) == len(results)
    assert await store.results.count_documents({}) == 1
    stored = await store.find("ad-1")
    newest = max(results, key=lambda result: (result.version, result.request_id))
    assert stored is not None and stored.request_id == newest.request_id


async def test_a_catalog_ad_claimed_by_another_ad_id_is_rejected_with_a_reason(
    store: ResultStore,
) -> None:
    await migrate(store)
    await store.upsert_many([finished("ad-1", catalog_ad_id="c-1")])
    report = await store.upsert_many(
        [finished("ad-2", catalog_ad_id="c-1"), finished("ad-3", catalog_ad_id="c-3")]
    )
    assert report.written == ["ad-3"]
    assert "another ad id" in report.rejected["ad-2"]
    assert await store.find("ad-2") is None
    by_catalog = await store.find_by_catalog("cars", "c-1")
    assert by_catalog is not None and by_catalog.ad_id == "ad-1"


def scanned_stages(plan: dict[str, Any]) -> set[str]:
    stages = {plan["stage"]}
    for child in ("inputStage", "queryPlan"):
        if child in plan:
            stages |= scanned_stages(plan[child])
    for child in plan.get("inputStages", []):
        stages |= scanned_stages(child)
    return stages


async def test_every_lookup_uses_an_index(store: ResultStore) -> None:
    await migrate(store)
    categories = ["vehicles", "animals", "food_drink", "electronics"]
    await store.upsert_many(
        finished(f"ad-{n}", category=categories[n % len(categories)]) for n in range(2000)
    )
    queries = {
        "by ad id": store.results.find({"_id": "ad-1234"}),
        "by catalog key": store.results.find({"catalog_name": "cars", "catalog_ad_id": "ad-7"}),
        "by category, newest first": store.results.find({"category": "animals"})
        .sort("updated_at", -1)
        .limit(20),
        "by status, newest first": store.results.find({"status": "failed"})
        .sort("updated_at", -1)
        .limit(20),
    }
    for name, cursor in queries.items():
        plan = (await cursor.explain())["queryPlanner"]["winningPlan"]
        stages = scanned_stages(plan)
        assert "IXSCAN" in stages and "COLLSCAN" not in stages, (name, plan)
    latest = await store.latest_in_category("animals", limit=3)
    assert [result.category for result in latest] == ["animals"] * 3


async def test_migrations_run_once_under_two_concurrent_runners(
    store: ResultStore, mongo: LocalMongo, mongo_database: str
) -> None:
    applied: list[int] = []

    def counting(version: int) -> Migration:
        async def apply(target: ResultStore) -> None:
            applied.append(version)
            await asyncio.sleep(0.3)  # long enough for the other runner to arrive

        return Migration(version, f"counted {version}", apply)

    migrations = (counting(1), counting(2), counting(3))
    first, second = new_store(mongo.uri, mongo_database), new_store(mongo.uri, mongo_database)
    try:
        ran = await asyncio.gather(migrate(first, migrations), migrate(second, migrations))
    finally:
        await first.close()
        await second.close()
    assert sorted(applied) == [1, 2, 3]
    assert sorted(m.version for runner in ran for m in runner) == [1, 2, 3]
    records = await store.database[MIGRATIONS_COLLECTION].find().to_list()
    states = {record["_id"]: record["state"] for record in records}
    assert states == dict.fromkeys([1, 2, 3], "done")
    assert await migrate(store, migrations) == []
    assert await pending(store, migrations) == []


async def test_the_real_migrations_create_the_indexes(store: ResultStore) -> None:
    assert await pending(store) == [1, 2, 3]
    await migrate(store)
    assert await pending(store) == []
    indexes = await store.results.index_information()
    assert indexes["catalog_key"]["unique"] is True
    assert {"_id_", "catalog_key", "category_recent", "status_recent"} <= set(indexes)
