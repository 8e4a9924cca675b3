"""Crashes, rebalances and shutdowns mid-stream: every ad ends with one complete result in the
table and in MongoDB, and the replays that at-least-once delivery causes are absorbed."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from tests.support.records import new_store
from tests.support.workers import (
    PlannedAd,
    Worker,
    assert_result_matches,
    consume_results,
    count_final,
    plan_ads,
    produce,
    scrape,
    stored_documents,
    value,
    wait_for_results,
)


async def assert_complete_everywhere(worker: Worker, ads: list[PlannedAd]) -> None:
    """Every ad final over HTTP, and one matching document per ad in MongoDB."""
    results = await wait_for_results(worker.url, ads, timeout=240)
    store = new_store(worker.mongo_uri, worker.database)
    try:
        documents = await stored_documents(store, ads, timeout=60)
        assert await store.results.count_documents({}) == len(ads)
    finally:
        await store.close()
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])
        assert_result_matches(ad, documents[ad.ad_id])
        assert documents[ad.ad_id]["request_id"] == results[ad.ad_id]["request_id"]


@pytest.mark.slow  # about 2 minutes; the other crash tests restart workers too
async def test_five_kills_during_a_stream_lose_nothing(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    ads = plan_ads(images, 500, seed=31, bad_share=0.1, max_images=2)
    ad_ids = [ad.ad_id for ad in ads]
    planned = {ad.ad_id: ad for ad in ads}
    producing = asyncio.create_task(produce(broker.bootstrap, ads, rate=50))
    rng = random.Random(31)
    for kill in range(5):
        # A random point: somewhere in the next stretch of the stream.
        target = (kill + 1) * 70 + rng.randint(-30, 30)
        while await count_final(worker.url, ad_ids) < target:
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.uniform(0, 1.0))
        worker.kill()
        await worker.start()
    await producing
    await assert_complete_everywhere(worker, ads)
    published = await consume_results(broker.bootstrap, set(ad_ids), timeout=60)
    for record in published:  # replays republish an ad: always complete
        assert_result_matches(planned[record["ad_id"]], record)
    samples = await scrape(worker.url)
    stale = value(samples, "classify_store_results_total", outcome="stale")
    print(
        f"\n5 kills, {len(ads)} ads sent, {len(ads)} complete results and documents; "
        f"{len(published)} results published ({len(published) - len(ads)} duplicates from "
        f"replays, absorbed); {stale:.0f} stale MongoDB writes since the last restart"
    )


async def test_a_second_worker_joining_and_leaving_loses_nothing(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    first = workers()
    await first.start()
    ads = plan_ads(images, 300, seed=32, bad_share=0.1, max_images=2)
    ad_ids = [ad.ad_id for ad in ads]
    producing = asyncio.create_task(produce(broker.bootstrap, ads, rate=30))
    while await count_final(first.url, ad_ids) < 60:
        await asyncio.sleep(0.2)
    second = workers()
    await second.start()  # the group rebalances: partitions move to the second worker
    while await count_final(first.url, ad_ids) < 180:
        await asyncio.sleep(0.2)
    second.stop()  # and back to the first
    await producing
    await assert_complete_everywhere(first, ads)


async def test_sigterm_finishes_in_time_and_the_next_worker_goes_on(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    ads = plan_ads(images, 200, seed=33, bad_share=0.1, max_images=2)
    ad_ids = [ad.ad_id for ad in ads]
    producing = asyncio.create_task(produce(broker.bootstrap, ads, rate=40))
    while await count_final(worker.url, ad_ids) < 50:
        await asyncio.sleep(0.1)
    assert worker.process is not None
    started = time.monotonic()
    worker.stop()
    stopped_in = time.monotonic() - started
    assert worker.process.returncode == 0, worker.log_tail()
    assert stopped_in < 20, f"SIGTERM took {stopped_in:.1f} s"
    print(f"\nSIGTERM mid-stream: exited cleanly in {stopped_in:.1f} s")
    await producing
    await worker.start()
    await assert_complete_everywhere(worker, ads)
