"""Results reach MongoDB through the broker, survive a MongoDB outage, and are served from it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.dev.mongo import LocalMongo
from tests.support.records import finished, new_store
from tests.support.workers import (
    Worker,
    assert_result_matches,
    plan_ads,
    produce,
    stored_documents,
    wait_for_results,
)


async def readiness(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
        body: dict[str, Any] = await response.json()
        return body


async def test_every_result_arrives_once_through_a_mongodb_outage(
    broker: LocalBroker,
    images: SampleImageServer,
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    mongo = LocalMongo(tmp_path / "outage-mongo")
    mongo.start()
    worker = workers(mongo_uri=mongo.uri)
    store = new_store(mongo.uri, worker.database)
    try:
        await worker.start()
        ads = plan_ads(images, 200, seed=11, bad_share=0.1, max_images=2)
        producing = asyncio.create_task(produce(broker.bootstrap, ads, rate=25))
        await stored_documents(store, ads[:20], timeout=60)

        mongo.stop()
        down_at = time.monotonic()
        while (await readiness(worker.url))["status"] != "degraded":
            await asyncio.sleep(0.2)
        state = await readiness(worker.url)
        assert state["ready"] is True and state["checks"]["store"]["ok"] is False
        # The worker keeps classifying: results keep arriving over HTTP from the table.
        await producing
        results = await wait_for_results(worker.url, ads, timeout=120)
        for ad in ads:
            assert_result_matches(ad, results[ad.ad_id])
        buffered_detail = state["checks"]["store"]["detail"]

        mongo.start()
        back_at = time.monotonic()
        documents = await stored_documents(store, ads, timeout=120)
        drained_s = time.monotonic() - back_at
        print(
            f"\nMongoDB down {back_at - down_at:.1f} s ({buffered_detail}); "
            f"all {len(ads)} results stored {drained_s:.1f} s after it returned"
        )
        assert len(documents) == len(ads)
        for ad in ads:
            assert_result_matches(ad, documents[ad.ad_id])
            assert documents[ad.ad_id]["request_id"] == results[ad.ad_id]["request_id"]
        while (await readiness(worker.url))["status"] != "ready":
            await asyncio.sleep(0.2)
    finally:
        await store.close()
        worker.stop()
        mongo.stop()


async def test_results_not_in_the_table_are_served_from_mongodb(
    broker: LocalBroker, workers: Callable[..., Worker], mongo: LocalMongo
) -> None:
    worker = workers()
    await worker.start()
    # Classified by a previous deployment: in MongoDB, never in this broker's table.
    store = new_store(mongo.uri, worker.database)
    try:
        while not await store.results.index_information():
            await asyncio.sleep(0.1)
        await store.upsert_many(
            [
                finished("old-1", catalog_ad_id="cat-1", category="animals"),
                finished("old-2", catalog_ad_id="cat-2", category="animals"),
            ]
        )
    finally:
        await store.close()
    async with aiohttp.ClientSession(worker.url) as session:
        async with session.get("/classify/results/old-1") as response:
            assert response.status == 200
            body = await response.json()
            assert body["ad_id"] == "old-1" and body["images"][0]["labels"][0]["name"] == "moped"
        query = {"catalog": "cars", "catalog_ad_id": "cat-2"}
        async with session.get("/classify/results", params=query) as response:
            assert response.status == 200
            assert (await response.json())["ad_id"] == "old-2"
        query = {"category": "animals", "limit": "5"}
        async with session.get("/classify/results", params=query) as response:
            listed = (await response.json())["results"]
            assert {result["ad_id"] for result in listed} == {"old-1", "old-2"}
        for path, params, status in [
            ("/classify/results/never-seen", {}, 404),
            ("/classify/results", {"catalog": "cars", "catalog_ad_id": "nope"}, 404),
            ("/classify/results", {"catalog": "cars"}, 400),
            ("/classify/results", {"category": "animals", "limit": "0"}, 400),
        ]:
            async with session.get(path, params=params) as response:
                assert response.status == status, (path, params)
                assert (await response.json())["error"]
