"""Helpers of the integration tests: worker processes, planned ads and what their results must
say, producing to and reading from the broker, scraping metrics, polling MongoDB."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.dev.processes import free_port, start_worker, stop_process, wait_until_ready
from classify_app.sdk import AsyncClassifyClient, ClassificationResult, ClassifyError
from tables.store import ResultStore

# What each sample photo may honestly be called by an ImageNet model.
EXPECTED_LABELS = {
    "coffee": {"espresso", "cup"},
    "chelsea": {"tiger cat", "Egyptian cat", "tabby"},
    "camera": {"tripod"},
    "motorcycle": {"moped", "motor scooter"},
    "rocket": {"missile", "projectile"},
}


# Broken image URLs (relative to the image server) and the reason each must get.
BAD_IMAGES = {
    "/status/404": "http_404",
    "/html-as-jpeg": "not_an_image",
    "/truncated.jpg": "corrupt_image",
    "/bomb.png": "too_many_pixels",
}


class Worker:
    """One `faust -A classify_app worker` process."""

    def __init__(
        self,
        broker: LocalBroker,
        datadir: Path,
        log_path: Path,
        mongo_uri: str,
        database: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {"CLASSIFY_MONGO_DATABASE": database, **(env or {})}
        self.broker = broker
        self.datadir = datadir
        self.log_path = log_path
        self.mongo_uri = mongo_uri
        self.database = database
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process, not waiting for anything."""
        self.process = start_worker(
            self.broker.url,
            self.datadir,
            self.port,
            log_path=self.log_path,
            mongo_uri=self.mongo_uri,
            extra_env=self.env,
        )
        return self.process

    async def start(self) -> float:
        """Start the process and wait until `/readyz` says ready; returns the seconds."""
        self.launch()
        try:
            return await wait_until_ready(self.url, timeout=90)
        except TimeoutError:
            raise AssertionError(f"worker not ready; log:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no commit, no flush."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process is not None:
            stop_process(self.process, timeout=30)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class PlannedAd:
    """An ad sent by a test, with what its result must say."""

    event: dict[str, Any]
    photos: dict[int, str] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def ad_id(self) -> str:
        return str(self.event["ad_id"])

    @property
    def expected_status(self) -> str:
        if not self.failures:
            return "done"
        return "failed" if not self.photos else "partial"


def plan_ads(
    images: SampleImageServer, count: int, *, seed: int, bad_share: float = 0.2, max_images: int = 5
) -> list[PlannedAd]:
    """`count` ads of 1 to `max_images` images, about `bad_share` of the images broken."""
    rng = random.Random(seed)
    planned = []
    for number in range(count):
        ad = PlannedAd(event={"ad_id": f"s{seed}-ad-{number}", "catalog_name": "test"})
        urls = []
        for index in range(rng.randint(1, max_images)):
            if rng.random() < bad_share:
                path = rng.choice(sorted(BAD_IMAGES))
                urls.append(images.url + path)
                ad.failures[index] = BAD_IMAGES[path]
            else:
                photo = rng.choice(sorted(EXPECTED_LABELS))
                urls.append(images.photo_url(photo))
                ad.photos[index] = photo
        ad.event["images"] = urls
        planned.append(ad)
    return planned


async def produce(
    bootstrap: str,
    ads: list[PlannedAd],
    *,
    rate: float | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Send the ads to the `ads` topic as the marketplace would (JSON, keyed by ad id);
    `options` are aiokafka's (TLS, SASL)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **(options or {}))
    await producer.start()
    try:
        for ad in ads:
            await producer.send("ads", json.dumps(ad.event).encode(), key=ad.ad_id.encode())
            if rate:
                await asyncio.sleep(1 / rate)
        await producer.flush()
    finally:
        await producer.stop()


async def wait_for_results(
    url: str, ads: list[PlannedAd], timeout: float, token: str | None = None
) -> dict[str, dict[str, Any]]:
    """Poll every ad's result over HTTP until it is final."""
    async with AsyncClassifyClient(url, token=token) as client:
        results = await asyncio.gather(*(client.wait(ad.ad_id, timeout=timeout) for ad in ads))
    return {result.ad_id: result.raw for result in results}


def assert_result_matches(ad: PlannedAd, result: dict[str, Any]) -> None:
    """The result is complete, and says what the planned photos and failures imply."""
    assert result["status"] == ad.expected_status, (ad.event, result)
    assert result["image_count"] == len(ad.event["images"])
    images = result["images"]
    assert [image["index"] for image in images] == list(range(len(ad.event["images"])))
    for image in images:
        index = image["index"]
        assert image["url"] == ad.event["images"][index]
        if index in ad.failures:
            assert image["status"] == "failed"
            assert image["error"]["reason"] == ad.failures[index], image
            assert image["error"]["message"]
        else:
            assert image["status"] == "done"
            assert image["labels"][0]["name"] in EXPECTED_LABELS[ad.photos[index]], image


async def read_topic(
    bootstrap: str, topic: str, done: Callable[[list[Any]], bool], timeout: float
) -> list[Any]:
    """Read a topic's JSON records from the start until `done(records)` says enough."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    seen: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while not done(seen):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    seen.extend(json.loads(record.value) for record in records)
    finally:
        await consumer.stop()
    return seen


async def consume_results(
    bootstrap: str, expected: set[str], timeout: float, topic: str = "results"
) -> list[Any]:
    """Read a results topic from the start until every expected ad was seen."""
    return await read_topic(
        bootstrap,
        topic,
        lambda seen: expected <= {record["ad_id"] for record in seen},
        timeout,
    )


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


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{url}/metrics") as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (sample, _), v in samples.items() if sample == name)


async def stored_documents(
    store: ResultStore, ads: list[PlannedAd], timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll MongoDB until every ad has a document; returns them as the API would show them."""
    ad_ids = [ad.ad_id for ad in ads]
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = await store.results.count_documents({"_id": {"$in": ad_ids}})
        except Exception:
            found = -1  # the server is still coming back
        if found == len(ad_ids):
            break
        assert time.monotonic() < deadline, f"{found} of {len(ad_ids)} results in MongoDB"
        await asyncio.sleep(0.2)
    documents = await store.results.find({"_id": {"$in": ad_ids}}).to_list()
    return {
        document["_id"]: json.loads(json.dumps(document, default=str)) for document in documents
    }
