"""The store writer keeps every result through a MongoDB outage, and pushes back when full."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from classify_app.dev.mongo import LocalMongo
from tables.store import ResultStore
from tables.writer import Done, ResultWriter
from tests.support.records import finished


async def test_results_wait_out_an_outage_and_are_written_once_in_order(tmp_path: Path) -> None:
    mongo = LocalMongo(tmp_path / "mongo")
    mongo.start()
    store = ResultStore(mongo.uri, "outage", "ad_results", timeout_s=0.5)
    writer = ResultWriter(store, capacity=5, bulk_size=3, migrate_on_start=True)
    settled: list[tuple[str, str | None]] = []

    def done_for(ad_id: str) -> Done:
        async def done(rejected: str | None) -> None:
            settled.append((ad_id, rejected))

        return done

    try:
        writer.start()
        await writer.put(finished("ad-0"), done_for("ad-0"), nothing)
        while len(settled) < 1:
            await asyncio.sleep(0.05)
        assert writer.health.ok

        mongo.stop()
        for number in range(1, 6):  # fills the writer's bulk and its buffer of 5
            await writer.put(finished(f"ad-{number}"), done_for(f"ad-{number}"), nothing)
        while writer.health.ok:
            await asyncio.sleep(0.05)
        assert "unreachable" in writer.health.detail
        for number in range(6, 9):
            await writer.put(finished(f"ad-{number}"), done_for(f"ad-{number}"), nothing)
        # Full: the next result waits instead of being dropped.
        blocked = asyncio.create_task(writer.put(finished("ad-9"), done_for("ad-9"), nothing))
        await asyncio.sleep(1.0)
        assert not blocked.done()
        assert writer.buffered == 8  # 5 waiting and 3 being written
        assert len(settled) == 1

        mongo.start()
        await asyncio.wait_for(blocked, 30)
        while len(settled) < 10:
            await asyncio.sleep(0.05)
        assert settled == [(f"ad-{number}", None) for number in range(10)]
        assert writer.health.ok
        assert await store.results.count_documents({}) == 10
        assert writer.stats.retries > 0 and writer.stats.written == 10
    finally:
        await writer.stop()
        await store.close()
        mongo.stop()


async def test_a_result_mongodb_cannot_take_costs_only_itself(store: ResultStore) -> None:
    writer = ResultWriter(store, capacity=10, bulk_size=10, migrate_on_start=True)
    settled: dict[str, str | None] = {}

    def done_for(ad_id: str) -> Done:
        async def done(rejected: str | None) -> None:
            settled[ad_id] = rejected

        return done

    broken = finished("ad-broken")
    broken.image_count = 2**70  # BSON integers have 8 bytes: the driver cannot encode it
    # In one bulk with results that are fine.
    for ad_id in ("ad-fine-1", "ad-broken", "ad-fine-2"):
        await writer.put(
            broken if ad_id == "ad-broken" else finished(ad_id), done_for(ad_id), nothing
        )
    try:
        writer.start()
        while len(settled) < 3:
            await asyncio.sleep(0.05)
    finally:
        await writer.stop()
    assert settled["ad-broken"] and "OverflowError" in settled["ad-broken"]
    assert settled["ad-fine-1"] is None and settled["ad-fine-2"] is None
    assert await store.find("ad-fine-1") is not None and await store.find("ad-fine-2") is not None


async def test_during_an_outage_buffered_results_are_handed_back(tmp_path: Path) -> None:
    mongo = LocalMongo(tmp_path / "mongo")
    mongo.start()
    store = ResultStore(mongo.uri, "give-back", "ad_results", timeout_s=0.5)
    writer = ResultWriter(store, capacity=100, bulk_size=3, migrate_on_start=True)
    settled: list[str] = []
    handed_back: list[str] = []

    def done_for(ad_id: str) -> Done:
        async def done(rejected: str | None) -> None:
            settled.append(ad_id)

        return done

    try:
        writer.start()
        await writer.put(finished("ad-0"), done_for("ad-0"), nothing)
        while not settled:
            await asyncio.sleep(0.05)
        mongo.stop()
        for number in range(1, 8):
            ad_id = f"ad-{number}"
            await writer.put(
                finished(ad_id), done_for(ad_id), functools.partial(handed_back.append, ad_id)
            )
        while writer.health.ok:
            await asyncio.sleep(0.05)
        # A rebalance (or a stop) does not wait for MongoDB: every unwritten result goes back.
        assert await asyncio.wait_for(writer.give_back(), 5) == 7
        assert sorted(handed_back) == [f"ad-{number}" for number in range(1, 8)]
        assert writer.buffered == 0 and settled == ["ad-0"]
        mongo.start()
        await writer.put(finished("ad-8"), done_for("ad-8"), nothing)
        while len(settled) < 2:
            await asyncio.sleep(0.05)
        assert settled == ["ad-0", "ad-8"]  # the writer went on
    finally:
        await writer.stop()
        await store.close()
        mongo.stop()


async def test_giving_back_as_a_result_arrives_does_not_hang(store: ResultStore) -> None:
    # A rebalance gives the writer's results back while results keep arriving: the writer's
    # task is cancelled in the very step its wait for a result ends. (With `asyncio.wait_for`
    # on Python 3.11 the cancellation was swallowed and the rebalance waited forever.)
    writer = ResultWriter(store, capacity=100, bulk_size=10, migrate_on_start=True)
    settled: list[str] = []

    async def done(rejected: str | None) -> None:
        settled.append("done")

    try:
        writer.start()
        for number in range(10):
            while not writer.health.ok or writer.buffered:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the writer waits for the next result
            await writer.put(finished(f"ad-{number}"), done, nothing)  # no await in between
            giving_back = asyncio.ensure_future(writer.give_back())
            finished_in_time, _ = await asyncio.wait({giving_back}, timeout=5)
            assert finished_in_time, f"give_back hung with result {number} arriving"
    finally:
        await writer.stop()


async def test_a_migration_the_data_breaks_makes_the_store_unready(store: ResultStore) -> None:
    # Two documents already share a catalog key: the unique index cannot be built.
    for ad_id in ("ad-1", "ad-2"):
        await store.results.insert_one({"_id": ad_id, "catalog_name": "c", "catalog_ad_id": "x"})
    writer = ResultWriter(store, capacity=10, bulk_size=10, migrate_on_start=True)
    try:
        writer.start()
        async with asyncio.timeout(20):
            while not writer.health.broken:
                await asyncio.sleep(0.05)
        assert "migration failed" in writer.health.detail and not writer.health.ok
        assert writer.stats.retries < 5  # not retried at MongoDB's pace as if it were down
    finally:
        await writer.stop()


def nothing() -> None:
    """A `give_back` for results the test does not expect back."""
