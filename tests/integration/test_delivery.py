"""Deliveries and offsets through the real broker: the broker is asked which offsets hold
records, a transactional upstream producer's markers are passed over, two table-only workers
answer every lookup and guard every route, a submission counts only once the broker has it,
and a MongoDB outage holds neither a rebalance nor a shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import Producer
from faust.types import TP

from classify_app.consumer import Consumer
from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.dev.mongo import LocalMongo
from classify_app.sdk import AsyncClassifyClient
from classify_app.settings import Settings
from classify_app.worker import ClassifyApp
from tests.support.records import new_store
from tests.support.workers import (
    Worker,
    assert_result_matches,
    plan_ads,
    produce,
    scrape,
    stored_documents,
    wait_for_results,
)

TABLE_ONLY = {"CLASSIFY_MONGO_URI": ""}


async def test_a_transactional_producers_markers_are_passed_over(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(env={**TABLE_ONLY, "CLASSIFY_PARTITIONS": "2"})
    await worker.start()
    ads = plan_ads(images, 40, seed=31, bad_share=0.0, max_images=1)
    # The ad service writes in transactions (librdkafka's: aiokafka's fail on Tansu): every
    # commit leaves a marker, an offset no consumer ever receives.
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "transactional.id": "ad-service", "linger.ms": 5}
    )
    producer.init_transactions()
    for start in range(0, len(ads), 5):
        producer.begin_transaction()
        for ad in ads[start : start + 5]:
            producer.produce("ads", json.dumps(ad.event).encode(), key=ad.ad_id.encode())
        producer.commit_transaction()
    producer.flush()

    results = await wait_for_results(worker.url, ads, timeout=120)
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])
    # Every partition of `ads` is committed to its end, past the markers: no livelock.
    deadline = time.monotonic() + 60
    while True:
        samples = await scrape(worker.url)
        lag = {
            dict(labels)["partition"]: value
            for (name, labels), value in samples.items()
            if name == "classify_consumer_lag" and dict(labels).get("topic") == "ads"
        }
        if lag and all(value == 0 for value in lag.values()):
            break
        assert time.monotonic() < deadline, f"ads never committed to its end: lag {lag}"
        await asyncio.sleep(1)
    log = worker.log_path.read_text()
    assert "do not exist (transaction markers" in log
    assert log.count("was never acknowledged, fetching again") < 5


async def test_the_broker_is_asked_which_offsets_hold_records(broker: LocalBroker) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("probed", num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": "probed"})
    producer.init_transactions()
    for _ in range(2):  # records 0-4, a marker at 5; records 6-10, a marker at 11
        producer.begin_transaction()
        for number in range(5):
            producer.produce("probed", b"value", key=str(number).encode(), partition=0)
        producer.commit_transaction()
    producer.flush()
    app = ClassifyApp(Settings(profile="local", broker=broker.url, mongo_uri=""))
    app.finalize()
    consumer = app._new_consumer()
    assert isinstance(consumer, Consumer)
    tp = TP("probed", 0)
    try:
        assert await consumer._existing_offsets(tp, 0, 12) == set(range(12)) - {5, 11}
        # Whether any record exists: the first one answers, wherever the range ends.
        assert await consumer._existing_offsets(tp, 3, 12, first_only=True) == {3}
        assert await consumer._existing_offsets(tp, 5, 7, first_only=True) == {6}
        # A trailing marker is no record: the tail is passed over.
        assert await consumer._existing_offsets(tp, 11, 12, first_only=True) == set()
        assert await consumer._existing_offsets(tp, 11, 12) == set()
    finally:
        await consumer._probe.stop()


async def test_two_table_only_workers_answer_every_lookup_and_guard_every_route(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    env = {
        **TABLE_ONLY,
        "CLASSIFY_PARTITIONS": "4",
        "CLASSIFY_API_TOKEN": "write-secret",
        "CLASSIFY_API_READ_TOKEN": "read-secret",
    }
    first, second = workers(env=env), workers(env=env)
    await first.start()
    await second.start()
    ads = plan_ads(images, 120, seed=32, bad_share=0.1, max_images=2)
    # An id that must be percent-encoded in the result URL.
    ads[0].event["ad_id"] = "odd id?/#1"
    await produce(broker.bootstrap, ads)

    for worker in (first, second):
        async with AsyncClassifyClient(worker.url, token="read-secret") as client:
            found = await asyncio.gather(*(client.wait(ad.ad_id, timeout=120) for ad in ads))
        # Whichever worker owns the ad's partition, both answer (table routing forwards).
        assert {result.ad_id for result in found} == {ad.ad_id for ad in ads}
        for ad, result in zip(ads, found, strict=True):
            assert_result_matches(ad, result.raw)

    async with aiohttp.ClientSession() as session:

        async def status(method: str, path: str, token: str | None = None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with session.request(method, first.url + path, headers=headers) as answer:
                return answer.status

        assert await status("GET", "/healthz") == 200
        assert await status("GET", "/readyz") == 200
        for path in ("/metrics", f"/classify/results/{ads[1].ad_id}", "/openapi.json"):
            assert await status("GET", path) == 401, path
            assert await status("GET", path, "wrong") == 401, path
            assert await status("GET", path, "read-secret") == 200, path
        assert await status("POST", "/classify", "read-secret") == 401
        # Every ad's embeddings at once: for the workers, which hold the full token.
        for path in ("/classify/similarity/save", "/classify/similarity/save/saved-1/x"):
            assert await status("GET", path, "read-secret") == 401, path
            assert await status("GET", path, "write-secret") == 501, path  # similarity off
        assert await status("GET", "/table/ad-results", "write-secret") == 404  # Faust's, off
        assert await status("GET", "/router/", "write-secret") == 404

    # The topics the workers only write were created with the configured partitions.
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(["results", "ads-dead-letter"])
    finally:
        await admin.close()
    assert {topic["topic"]: len(topic["partitions"]) for topic in described} == {
        "results": 4,
        "ads-dead-letter": 4,
    }


async def test_a_submission_is_accepted_only_once_the_broker_has_it(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(env=TABLE_ONLY)
    await worker.start()
    ad = {"ad_id": "sub-1", "catalog_name": "c", "images": [images.photo_url("coffee")]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{worker.url}/classify", json=ad) as answer:
            assert answer.status == 202
        broker.stop()
        started = time.monotonic()
        async with session.post(f"{worker.url}/classify", json={**ad, "ad_id": "sub-2"}) as answer:
            body = await answer.json()
            assert answer.status == 503 and body["error"] == "broker_unavailable", body
            assert answer.headers["Retry-After"]
        assert time.monotonic() - started < 30
    worker.kill()  # its broker is gone: a clean stop would wait for it


async def test_a_mongodb_outage_holds_neither_a_rebalance_nor_a_shutdown(
    broker: LocalBroker,
    images: SampleImageServer,
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    mongo = LocalMongo(tmp_path / "outage-mongo")
    mongo.start()
    first = workers(mongo_uri=mongo.uri, env={"CLASSIFY_PARTITIONS": "4"})
    second = workers(mongo_uri=mongo.uri, env={"CLASSIFY_PARTITIONS": "4"})
    store = new_store(mongo.uri, first.database)
    try:
        await first.start()
        ads = plan_ads(images, 80, seed=33, bad_share=0.1, max_images=2)
        await produce(broker.bootstrap, ads[:20])
        await stored_documents(store, ads[:20], timeout=60)

        mongo.stop()
        await produce(broker.bootstrap, ads[20:])
        await wait_for_results(first.url, ads, timeout=120)  # classified, waiting for MongoDB
        samples = await scrape(first.url)
        assert samples[("classify_store_buffered_results", frozenset())] > 0

        # A second worker joins: the rebalance must not wait for MongoDB.
        joined = await second.start()
        assert joined < 60, f"the second worker took {joined:.0f} s to join"
        # And the first one stops without waiting for MongoDB either.
        assert first.process is not None
        stopped_at = time.monotonic()
        first.stop()
        assert time.monotonic() - stopped_at < 25
        assert first.process.returncode == 0

        mongo.start()
        documents = await stored_documents(store, ads, timeout=180)
        assert len(documents) == len(ads)
        for ad in ads:
            assert_result_matches(ad, documents[ad.ad_id])
        assert await store.results.count_documents({}) == len(ads)
    finally:
        await store.close()
        second.stop()
        mongo.stop()
