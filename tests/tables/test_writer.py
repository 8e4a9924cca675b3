"""The store writer keeps every result through a MongoDB outage, and pushes back when full."""

from __future__ import annotations

import asyncio
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
        await writer.put(finished("ad-0"), done_for("ad-0"))
        while len(settled) < 1:
            await asyncio.sleep(0.05)
        assert writer.health.ok

        mongo.stop()
        for number in range(1, 6):  # fills the writer's bulk and its buffer of 5
            await writer.put(finished(f"ad-{number}"), done_for(f"ad-{number}"))
        while writer.health.ok:
            await asyncio.sleep(0.05)
        assert "unreachable" in writer.health.detail
        for number in range(6, 9):
            await writer.put(finished(f"ad-{number}"), done_for(f"ad-{number}"))
        # Full: the next result waits instead of being dropped.
        blocked = asyncio.create_task(writer.put(finished("ad-9"), done_for("ad-9")))
        await asyncio.sleep(1.0)
        assert not blocked.done()
        assert writer.buffered == 5
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


async def test_a_bulk_mongodb_cannot_take_is_refused_and_the_writer_goes_on(
    store: ResultStore,
) -> None:
    writer = ResultWriter(store, capacity=10, bulk_size=10, migrate_on_start=True)
    settled: dict[str, str | None] = {}

    def done_for(ad_id: str) -> Done:
        async def done(rejected: str | None) -> None:
            settled[ad_id] = rejected

        return done

    broken = finished("ad-broken")
    broken.image_count = 2**70  # BSON integers have 8 bytes: the driver cannot encode it
    try:
        writer.start()
        await writer.put(broken, done_for("ad-broken"))
        while "ad-broken" not in settled:
            await asyncio.sleep(0.05)
        await writer.put(finished("ad-fine"), done_for("ad-fine"))
        while "ad-fine" not in settled:
            await asyncio.sleep(0.05)
    finally:
        await writer.stop()
    assert settled["ad-broken"] and settled["ad-fine"] is None
    assert await store.find("ad-fine") is not None
