"""Hostile input through the broker: every case gets its reason, the worker keeps going with
bounded memory, and the API refuses what it must."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.sdk import AsyncClassifyClient, ClassifyError
from tests.support.workers import PlannedAd, Worker, read_topic, scrape, value, wait_for_results

TOKEN = "s3cret-token"


async def test_hostile_images_and_events_each_get_their_reason(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(
        env={
            "CLASSIFY_API_TOKEN": TOKEN,
            # Only the image server: every other private address stays forbidden.
            "CLASSIFY_DOWNLOAD_ALLOW_NETS": "127.0.0.1/32",
            "CLASSIFY_DOWNLOAD_TIMEOUT_S": "2",
            "CLASSIFY_DOWNLOAD_RETRY_DELAY_S": "0.2",
        }
    )
    await worker.start()
    server = images.url
    cases = {
        "http://10.0.0.1/a.jpg": "forbidden_address",
        "http://169.254.169.254/latest/meta-data/": "forbidden_address",
        f"http://[::1]:{images.port}/photos/coffee.jpg": "forbidden_address",
        f"{server}/redirect?to=http://192.168.0.10/a.jpg": "forbidden_address",
        "file:///etc/passwd": "unsupported_scheme",
        f"{server}/endless": "timeout",
        f"{server}/huge": "too_large",
        f"{server}/bomb.png": "too_many_pixels",
        f"{server}/truncated.jpg": "corrupt_image",
        f"{server}/html-as-jpeg": "not_an_image",
        f"{server}/status/503": "http_503",
        f"{server}/frames.gif": None,  # classified from its first frame
        f"{server}/strip.png": "extreme_aspect_ratio",  # 90 bytes, 2000 x 1
        f"{server}/deep.png": None,  # 30 MP of 16-bit pixels: decoded within the budget
        f"{server}/bad-redirect": "invalid_url",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/": "forbidden_address",  # NAT64
        "http://[2002:a00:1::1]/a.jpg": "forbidden_address",  # 6to4 of 10.0.0.1
        "http://[fec0::1]/a.jpg": "forbidden_address",  # site-local
        f"{server}/flaky/hostile/2": None,  # two 503s, then the photo: retried
    }
    ads: list[dict[str, Any]] = [
        {"ad_id": f"hostile-{number}", "catalog_name": "hostile", "images": [url]}
        for number, url in enumerate(cases)
    ]
    async with AsyncClassifyClient(worker.url, token=TOKEN) as client:
        for ad in ads:
            await client.submit(ad)
    results = await wait_for_results(
        worker.url, [PlannedAd(event=ad) for ad in ads], timeout=120, token=TOKEN
    )
    for ad, (url, reason) in zip(ads, cases.items(), strict=True):
        image = results[ad["ad_id"]]["images"][0]
        if reason is None:
            assert image["status"] == "done", (url, image)
        else:
            assert image["status"] == "failed" and image["error"]["reason"] == reason, (url, image)
            assert image["error"]["message"]
    retried = results[ads[list(cases).index(f"{server}/status/503")]["ad_id"]]
    assert "after 3 attempts" in retried["images"][0]["error"]["message"]

    malformed = [
        b"{nope",
        b"\xff\xfe binary",
        b"[1, 2]",
        event(ad_id=["x"]),
        event(images="http://a/b.jpg"),
        event(images=[1]),
        event(price="cheap"),
        event(catalog_name=None),
        event(images=["http://a/b.jpg"] * 100),
        b"[" * 60_000 + b"]" * 60_000,
        b'{"ad_id": ' + b"9" * 5000 + b"}",
        event(price=int("1" + "0" * 400)),
        b'{"ad_id": "\\ud800", "catalog_name": "c", "images": ["http://a/b.jpg"]}',
        event(updated_at=1e300),
        event(event_id="e" * 1_000_000),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        for number, payload in enumerate(malformed):
            await producer.send_and_wait("ads", payload, key=f"bad-{number}".encode())
    finally:
        await producer.stop()
    letters = await read_topic(
        broker.bootstrap, "ads-dead-letter", lambda seen: len(seen) >= len(malformed), timeout=30
    )
    assert sorted(letter["reason"] for letter in letters) == sorted(
        ["malformed_json"] * 4 + ["invalid_event"] * 9 + ["too_many_images", "event_too_large"]
    )
    assert all(letter["message"] and letter["payload"] for letter in letters)
    assert all(len(json.dumps(letter)) < 1_000_000 for letter in letters)

    # Still working, memory bounded after a 100 MB answer and an endless one.
    async with AsyncClassifyClient(worker.url, token=TOKEN) as client:
        await client.submit(
            {"ad_id": "after", "catalog_name": "hostile", "images": [images.photo_url("coffee")]}
        )
        assert (await client.wait("after", timeout=30)).status == "done"
    samples = await scrape(worker.url, token=TOKEN)
    assert value(samples, "process_resident_memory_bytes") < 2.5e9
    assert value(samples, "classify_download_retries_total", reason="http_503") >= 4


async def test_the_api_requires_its_token_and_bounds_bodies(
    images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(env={"CLASSIFY_API_TOKEN": TOKEN})
    await worker.start()
    ad = {"ad_id": "api-tok", "catalog_name": "c", "images": [images.photo_url("coffee")]}
    for token in (None, "wrong"):
        async with AsyncClassifyClient(worker.url, token=token) as client:
            try:
                await client.submit(ad)
                raise AssertionError("accepted without the right token")
            except ClassifyError as exc:
                assert exc.status == 401 and exc.reason == "unauthorized"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.post(f"{worker.url}/classify", data=b"x" * 300_000) as response:
            assert response.status == 413
        async with session.get(f"{worker.url}/classify/results/api-tok") as response:
            assert response.status in (200, 404)  # with the token: the lookup itself answers
        async with session.post(f"{worker.url}/classify", json={"ad_id": 5}) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "invalid_event"
        async with session.post(f"{worker.url}/classify", json=ad) as response:
            assert response.status == 202
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{worker.url}/classify/results/api-tok") as response:
            assert response.status == 401  # every route but the probes needs the token
        async with session.get(f"{worker.url}/readyz") as response:
            assert response.status == 200


def event(**fields: Any) -> bytes:
    """A valid ad event with `fields` replaced."""
    ad = {"ad_id": "m", "catalog_name": "c", "images": ["http://img.example.com/a.jpg"]}
    return json.dumps({**ad, **fields}).encode()
