"""A marketplace's own world, through the real broker: events with fields we do not know and
in shapes of their own, a librdkafka producer with its partitioner and keyless edits, a TLS
cluster, credentials that fail, Faust's environment names, and a shadow deployment."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.sdk import AsyncClassifyClient
from tests.support.tls import TlsTerminator, make_certificates
from tests.support.workers import (
    EXPECTED_LABELS,
    PlannedAd,
    Worker,
    assert_result_matches,
    consume_results,
    plan_ads,
    produce,
    scrape,
    value,
    wait_for_results,
)

TABLE_ONLY = {"CLASSIFY_MONGO_URI": ""}
PHOTOS = sorted(EXPECTED_LABELS)


async def produce_raw(
    bootstrap: str, events: Sequence[tuple[bytes | None, dict[str, Any]]]
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, event in events:
            await producer.send_and_wait("ads", json.dumps(event).encode(), key=key)
    finally:
        await producer.stop()


async def test_events_with_fields_we_do_not_know_are_classified(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(env=TABLE_ONLY)
    await worker.start()
    ads = plan_ads(images, 20, seed=41, bad_share=0.0, max_images=1)
    extra = {"seller": {"id": 7, "rating": 4.5}, "colour": "blue", "promoted": True}
    await produce_raw(broker.bootstrap, [(ad.ad_id.encode(), {**ad.event, **extra}) for ad in ads])
    results = await wait_for_results(worker.url, ads, timeout=90)
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])
    samples = await scrape(worker.url)
    assert value(samples, "classify_event_unknown_fields_total") == 3 * len(ads)
    # Partitioned as Faust partitions: every outcome folded where it was made. Only an ad in
    # flight across a rebalance (the one worker missing a heartbeat on a loaded machine) may
    # take the topic instead, and is then counted there.
    local = value(samples, "classify_outcomes_total", route="local")
    crossed = value(samples, "classify_outcomes_total", route="topic")
    assignments = worker.log_path.read_text().count("Setting newly assigned partitions")
    if assignments == 1:
        assert (local, crossed) == (len(ads), 0), worker.log_path
    else:
        assert local + crossed >= len(ads), (local, crossed, assignments)
    assert "Ad events carry fields that are ignored: 'colour', 'promoted', 'seller'" in (
        worker.log_path.read_text()
    )


SHAPES = {
    "classifieds": (
        "ad_id=id,catalog_name=category.slug,images=photos[].url,updated_at=modified,"
        "title=headline",
        lambda number, urls: {
            "id": 1000 + number,
            "category": {"slug": "cars", "name": "Cars & vans"},
            "photos": [{"url": url, "w": 800, "h": 600} for url in urls],
            "modified": "2026-11-30T10:00:00+00:00",
            "headline": f"Car number {number}",
            "seller": {"id": 7},
        },
        lambda number: str(1000 + number),
    ),
    "listings": (
        "ad_id=listing.uuid,catalog_name=listing.section,catalog_ad_id=listing.external_ref,"
        "images=media.images,price=pricing.amount,updated_at=event.at",
        lambda number, urls: {
            "listing": {
                "uuid": f"lst-{number}",
                "section": "furniture",
                "external_ref": f"S{number}",
            },
            "media": {"images": urls, "cover": 0},
            "pricing": {"amount": 10.5 * number, "currency": "EUR"},
            "event": {"type": "listing.updated", "at": 1795000000 + number},
        },
        lambda number: f"lst-{number}",
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_a_marketplaces_own_event_shape_is_mapped(
    shape: str, broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    mapping, make, ad_id_of = SHAPES[shape]
    worker = workers(env={**TABLE_ONLY, "CLASSIFY_EVENT_FIELDS": mapping})
    await worker.start()
    planned = []
    events = []
    for number in range(12):
        urls = [images.photo_url(PHOTOS[number % len(PHOTOS)]), f"{images.url}/status/404"]
        planned.append(
            PlannedAd(
                event={"ad_id": ad_id_of(number), "images": urls},
                photos={0: PHOTOS[number % len(PHOTOS)]},
                failures={1: "http_404"},
            )
        )
        events.append((ad_id_of(number).encode(), make(number, urls)))
    await produce_raw(broker.bootstrap, events)
    results = await wait_for_results(worker.url, planned, timeout=90)
    for ad in planned:
        assert_result_matches(ad, results[ad.ad_id])
    assert {results[ad.ad_id]["catalog_name"] for ad in planned} == {
        "cars" if shape == "classifieds" else "furniture"
    }


async def test_a_librdkafka_producer_with_keyless_edits_is_classified_in_order(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    env = {**TABLE_ONLY, "CLASSIFY_PARTITIONS": "4"}
    first, second = workers(env=env), workers(env=env)
    await first.start()
    await second.start()
    ads = plan_ads(images, 40, seed=42, bad_share=0.0, max_images=1)
    # librdkafka's default partitioner (consistent_random: CRC32 of the key), as Go, Node and
    # .NET producers use it: not the partition aiokafka or Java would choose.
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for ad in ads:
        producer.produce(
            "ads", json.dumps({**ad.event, "updated_at": 100}).encode(), key=ad.ad_id.encode()
        )
    producer.flush(30)
    await wait_for_results(first.url, ads, timeout=120)
    # CRC32 puts most ads on a partition other than their result's: those outcomes cross the
    # outcomes topic to the worker that holds the result, the others are folded at once.
    routes = [await scrape(worker.url) for worker in (first, second)]
    crossed = sum(value(samples, "classify_outcomes_total", route="topic") for samples in routes)
    folded = sum(value(samples, "classify_outcomes_total", route="local") for samples in routes)
    assert crossed + folded >= len(ads)  # more if a rebalance replayed some
    assert crossed > len(ads) / 2
    # Edits of every other ad, without a key (any partition), newer first then older: the
    # newer must win wherever each lands.
    edited = ads[::2]
    for ad in edited:
        newer = {**ad.event, "images": [images.photo_url("camera")], "updated_at": 300}
        older = {**ad.event, "images": [images.photo_url("rocket")], "updated_at": 200}
        producer.produce("ads", json.dumps(newer).encode())
        producer.produce("ads", json.dumps(older).encode())
    producer.flush(30)
    for ad in edited:
        ad.event["images"] = [images.photo_url("camera")]
        ad.photos = {0: "camera"}
    deadline = time.monotonic() + 120
    for worker in (first, second):
        async with AsyncClassifyClient(worker.url) as client:
            while True:
                found = await asyncio.gather(*(client.result(ad.ad_id) for ad in ads))
                current = [
                    result is not None
                    and result.final
                    and result.raw["version"] == (300 if ad in edited else 100)
                    for ad, result in zip(ads, found, strict=True)
                ]
                if all(current):
                    break
                assert time.monotonic() < deadline, f"{current.count(False)} not up to date"
                await asyncio.sleep(0.5)
        for ad, result in zip(ads, found, strict=True):
            assert result is not None
            assert_result_matches(ad, result.raw)


async def test_tls_with_a_throwaway_ca_works_and_an_untrusted_one_fails_at_start(
    images: SampleImageServer, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    certificates = make_certificates(tmp_path / "tls")
    plain = LocalBroker()
    terminator = TlsTerminator(certificates, plain.port, mutual=True)
    tls_broker = LocalBroker(plain.port, advertised_port=terminator.port)
    tls_broker.start()
    try:
        with terminator.running():
            secured = {
                **TABLE_ONLY,
                "CLASSIFY_BROKER": f"kafka://127.0.0.1:{terminator.port}",
                "CLASSIFY_KAFKA_TLS": "true",
                "CLASSIFY_KAFKA_CA_FILE": str(certificates.ca),
                "CLASSIFY_KAFKA_CERT_FILE": str(certificates.client_cert),
                "CLASSIFY_KAFKA_KEY_FILE": str(certificates.client_key),
            }
            worker = workers(env=secured)
            worker.broker = tls_broker
            await worker.start()
            ads = plan_ads(images, 10, seed=43, bad_share=0.0, max_images=1)
            client_tls = ssl.create_default_context(cafile=certificates.ca)
            client_tls.load_cert_chain(certificates.client_cert, certificates.client_key)
            await produce(
                f"127.0.0.1:{terminator.port}",
                ads,
                options={"security_protocol": "SSL", "ssl_context": client_tls},
            )
            results = await wait_for_results(worker.url, ads, timeout=90)
            for ad in ads:
                assert_result_matches(ad, results[ad.ad_id])

            # Trusting another CA: one line at start, and out (no retry loop).
            untrusted = workers(
                env={**secured, "CLASSIFY_KAFKA_CA_FILE": str(certificates.other_ca)}
            )
            assert_refused_at_start(untrusted, "certificate verify failed")
            # No client certificate, where the cluster asks for one.
            anonymous = workers(
                env={**secured, "CLASSIFY_KAFKA_CERT_FILE": "", "CLASSIFY_KAFKA_KEY_FILE": ""}
            )
            assert_refused_at_start(anonymous, "cannot connect to Kafka")
            worker.stop()  # while its broker is still there: a clean stop needs it
    finally:
        tls_broker.stop()


async def test_sasl_credentials_the_cluster_refuses_fail_at_start(
    workers: Callable[..., Worker],
) -> None:
    secured = LocalBroker(authentication=True)
    secured.start()
    try:
        worker = workers(
            env={
                **TABLE_ONLY,
                "CLASSIFY_BROKER": secured.url,
                "CLASSIFY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "CLASSIFY_KAFKA_USERNAME": "classify",
                "CLASSIFY_KAFKA_PASSWORD": "pw-8c1f0e",
            }
        )
        assert_refused_at_start(worker, "cannot connect to Kafka")
        assert "pw-8c1f0e" not in worker.log_path.read_text()  # the password is never logged
    finally:
        secured.stop()


def assert_refused_at_start(worker: Worker, cause: str) -> None:
    started = time.monotonic()
    process = worker.launch()
    try:
        assert process.wait(60) == 3, worker.log_tail()
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 60
    critical = [line for line in worker.log_path.read_text().splitlines() if "[CRITICAL]" in line]
    assert len(critical) == 1 and cause in critical[0], worker.log_tail()


async def test_faust_environment_names_do_not_override_ours(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    # What Kubernetes service links of services named `web` and `broker` put in every pod.
    worker = workers(
        env={
            **TABLE_ONLY,
            "BROKER_URL": "kafka://10.0.0.1:9092",
            "WEB_PORT": "tcp://10.0.0.2:80",
            "WEB_HOST": "10.0.0.2",
            "TOPIC_PARTITIONS": "99",
            "APP_DATADIR": "/nonexistent",
        }
    )
    await worker.start()
    ads = plan_ads(images, 5, seed=44, bad_share=0.0, max_images=1)
    await produce(broker.bootstrap, ads)
    results = await wait_for_results(worker.url, ads, timeout=60)
    for ad in ads:
        assert_result_matches(ad, results[ad.ad_id])
    assert "10.0.0.1" not in worker.log_path.read_text()


async def test_a_shadow_deployment_runs_beside_the_main_one(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    main = workers(env=TABLE_ONLY)
    shadow = workers(
        env={
            **TABLE_ONLY,
            "CLASSIFY_APP_ID": "classify-shadow",
            "CLASSIFY_RESULTS_TOPIC": "results-shadow",
        }
    )
    await main.start()
    await shadow.start()
    ads = plan_ads(images, 30, seed=45, bad_share=0.1, max_images=2)
    await produce(broker.bootstrap, ads)
    # Each deployment is its own consumer group: both classify every ad, into their own
    # table and their own results topic.
    for worker in (main, shadow):
        results = await wait_for_results(worker.url, ads, timeout=120)
        for ad in ads:
            assert_result_matches(ad, results[ad.ad_id])
    expected = {ad.ad_id for ad in ads}
    for topic in ("results", "results-shadow"):
        published = await consume_results(broker.bootstrap, expected, timeout=60, topic=topic)
        assert expected <= {record["ad_id"] for record in published}
    assert "classify-shadow-image-outcomes" in shadow.log_path.read_text()
