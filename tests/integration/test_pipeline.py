"""End to end through the broker: ads topic -> download -> inference -> table -> HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.sdk import AsyncClassifyClient
from tests.support.workers import (
    Worker,
    assert_result_matches,
    consume_results,
    plan_ads,
    produce,
    read_topic,
    wait_for_results,
)


async def test_every_ad_is_classified_with_reasons_for_bad_images(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[[], Worker]
) -> None:
    worker = workers()
    await worker.start()
    ads = plan_ads(images, 220, seed=1)
    assert sum(len(ad.failures) for ad in ads) >= 50  # plenty of every kind of broken image
    await produce(broker.bootstrap, ads)

    results = await wait_for_results(worker.url, ads, timeout=180)
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])
        assert results[ad.ad_id]["latency_seconds"] > 0
    published = await consume_results(broker.bootstrap, {ad.ad_id for ad in ads}, timeout=30)
    assert {record["status"] for record in published} <= {"done", "partial", "failed"}


async def test_http_api_submits_validates_and_answers(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[[], Worker]
) -> None:
    worker = workers()
    await worker.start()
    async with AsyncClassifyClient(worker.url) as client:
        assert await client.result("never-sent") is None
        accepted = await client.submit(
            {"ad_id": "api-1", "catalog_name": "pets", "images": [images.photo_url("chelsea")]}
        )
        assert accepted.result_url == "/classify/results/api-1"
        result = await client.wait("api-1", timeout=30, request_id=accepted.request_id)
        assert result.status == "done" and result.category == "animals"
        assert result.images[0].labels[0].name in {"tiger cat", "Egyptian cat", "tabby"}
        async with client._session.post(f"{worker.url}/classify", data=b"{oops") as response:
            assert response.status == 400
            assert (await response.json())["error"] == "malformed_json"
        async with client._session.get(f"{worker.url}/readyz") as response:
            body = await response.json()
            assert response.status == 200 and body["ready"] is True
            assert set(body["checks"]) == {"model", "partitions", "tables", "store"}
            assert body["status"] == "ready"


async def test_malformed_events_go_to_the_dead_letter_topic_and_the_worker_goes_on(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[[], Worker]
) -> None:
    worker = workers()
    await worker.start()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("ads", b"{truncated", key=b"bad-1")
        await producer.send_and_wait("ads", json.dumps({"ad_id": "bad-2"}).encode(), key=b"bad-2")
    finally:
        await producer.stop()
    ads = plan_ads(images, 3, seed=2, bad_share=0)
    await produce(broker.bootstrap, ads)
    results = await wait_for_results(worker.url, ads, timeout=60)
    assert all(results[ad.ad_id]["status"] == "done" for ad in ads)

    letters = await read_topic(
        broker.bootstrap, "ads-dead-letter", lambda seen: len(seen) >= 2, timeout=10
    )
    assert sorted(letter["reason"] for letter in letters) == ["invalid_event", "malformed_json"]
    assert {letter["payload"] for letter in letters} >= {"{truncated"}
