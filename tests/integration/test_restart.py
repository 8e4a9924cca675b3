"""Crash safety: SIGKILL a worker mid-stream, start it again, and nothing is lost or corrupted
(in the table, on the `results` topic, in MongoDB)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from classify_app.client import AsyncClassifyClient, ClassificationResult, ClassifyError
from classify_app.local import LocalBroker, SampleImageServer
from tests.conftest import new_store
from tests.integration.conftest import (
    Worker,
    assert_result_matches,
    consume_results,
    plan_ads,
    produce,
    wait_for_results,
)
from tests.integration.test_store import stored_documents


async def count_final(url: str, ad_ids: list[str]) -> int:
    """How many of the ads are final, as one worker answers (a 503 while rebalancing: not)."""
    async with AsyncClassifyClient(url) as client:
        results = await asyncio.gather(
            *(client.result(ad_id) for ad_id in ad_ids), return_exceptions=True
        )
    for result in results:
        if isinstance(result, ClassifyError) and not result.temporary:
            raise result
    return sum(1 for result in results if isinstance(result, ClassificationResult) and result.final)


async def test_a_killed_worker_loses_nothing(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[[], Worker]
) -> None:
    first = workers()
    await first.start()
    ads = plan_ads(images, 300, seed=3, bad_share=0.1, max_images=3)
    ad_ids = [ad.ad_id for ad in ads]
    producing = asyncio.create_task(produce(broker.bootstrap, ads, rate=60))
    while await count_final(first.url, ad_ids) < 40:
        await asyncio.sleep(0.2)
    first.kill()  # mid-stream: ads in download, in inference and in the table at once
    await producing

    second = workers()
    await second.start()
    results = await wait_for_results(second.url, ads, timeout=180)
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])

    store = new_store(second.mongo_uri, second.database)
    try:
        documents = await stored_documents(store, ads, timeout=60)
    finally:
        await store.close()
    for ad in ads:
        assert_result_matches(ad, documents[ad.ad_id])
        assert documents[ad.ad_id]["request_id"] == results[ad.ad_id]["request_id"]

    published = await consume_results(broker.bootstrap, set(ad_ids), timeout=60)
    by_ad: dict[str, list[dict]] = {}
    for record in published:
        by_ad.setdefault(record["ad_id"], []).append(record)
    for ad in ads:
        # At-least-once: an ad may be published again after the crash, always complete.
        for record in by_ad[ad.ad_id]:
            assert_result_matches(ad, record)
