"""`GET /metrics` after real ads went through the broker: every stage moved by what was sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from tests.support.workers import Worker, plan_ads, produce, scrape, total, value, wait_for_results


async def test_metrics_count_what_was_sent(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    ads = plan_ads(images, 60, seed=21, bad_share=0.25, max_images=3)
    image_count = sum(len(ad.event["images"]) for ad in ads)
    failures = Counter(reason for ad in ads for reason in ad.failures.values())
    classified = image_count - sum(failures.values())
    statuses = Counter(ad.expected_status for ad in ads)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("ads", b"{not json", key=b"broken")
    finally:
        await producer.stop()
    await produce(broker.bootstrap, ads)
    await wait_for_results(worker.url, ads, timeout=120)

    samples = await scrape(worker.url)
    for _ in range(50):  # MongoDB writes follow the results by a few milliseconds
        if value(samples, "classify_store_results_total", outcome="written") >= len(ads):
            break
        await asyncio.sleep(0.2)
        samples = await scrape(worker.url)

    assert total(samples, "classify_ads_total") == len(ads)
    for status, count in statuses.items():
        assert value(samples, "classify_ads_total", status=status) == count, status
    assert value(samples, "classify_images_total", status="done") == classified
    assert value(samples, "classify_images_total", status="failed") == sum(failures.values())
    for reason, count in failures.items():
        assert value(samples, "classify_image_failures_total", reason=reason) == count, reason
    assert value(samples, "classify_dead_letters_total", reason="malformed_json") == 1

    # Every image was downloaded once; the 404s failed there, the rest were fetched.
    assert value(samples, "classify_download_seconds_count", outcome="failed") == failures.get(
        "http_404", 0
    )
    assert total(samples, "classify_download_seconds_count") == image_count
    assert value(samples, "classify_preprocess_seconds_count") == classified
    assert value(samples, "classify_batch_size_sum") == classified
    assert value(samples, "classify_queue_wait_seconds_count") == classified
    batches = value(samples, "classify_batch_size_count")
    assert 1 <= batches <= classified
    assert value(samples, "classify_inference_seconds_count") == batches
    assert value(samples, "classify_end_to_end_seconds_count") == len(ads)
    assert value(samples, "classify_end_to_end_seconds_sum") > 0

    assert value(samples, "classify_store_results_total", outcome="written") == len(ads)
    assert value(samples, "classify_store_up") == 1
    assert value(samples, "classify_store_write_seconds_count") >= 1
    assert value(samples, "classify_downloads_in_progress") == 0
    assert value(samples, "classify_images_waiting_for_inference") == 0
    assert value(samples, "process_resident_memory_bytes") > 100e6
    assert any(
        name == "classify_model_info" and dict(labels)["name"] == "efficientnet-lite0"
        for name, labels in samples
    )
    lag_topics = {
        dict(labels)["topic"] for name, labels in samples if name == "classify_consumer_lag"
    }
    assert lag_topics == {
        "ads",
        "classify-app-image-outcomes",
        "classify-app-download-retries",
        "results",
    }
