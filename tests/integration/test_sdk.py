"""What a user integrates with, against a running worker: the OpenAPI document (checked against
real answers), the Python clients, and every command of the command line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.dev.processes import free_port
from classify_app.sdk import (
    AsyncClassifyClient,
    ClassificationResult,
    ClassifyClient,
    ClassifyError,
    ClassifyTimeout,
    ClassifyUnavailable,
)
from tests.support.workers import Worker, read_topic


def check(document: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """`body` matches what the document promises for this path, method and status."""
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**schema, "components": document["components"]})
    validator.validate(body)


async def test_the_openapi_document_describes_the_real_answers(
    images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    ad = {"ad_id": "oa-1", "catalog_name": "pets", "images": [images.photo_url("chelsea")]}
    async with aiohttp.ClientSession(worker.url) as session:
        async with session.get("/openapi.json") as response:
            document = await response.json()
        validate_spec(document)
        calls: list[tuple[str, str, str, dict[str, Any], int]] = [
            ("/classify", "post", "/classify", {"json": ad}, 202),
            ("/classify", "post", "/classify", {"data": b"{"}, 400),
            ("/classify", "post", "/classify", {"data": b"x" * 300_000}, 413),
            ("/classify/results/{ad_id}", "get", "/classify/results/never", {}, 404),
            ("/classify/results", "get", "/classify/results", {}, 400),
            ("/healthz", "get", "/healthz", {}, 200),
            ("/readyz", "get", "/readyz", {}, 200),
        ]
        for path, method, url, options, status in calls:
            async with session.request(method, url, **options) as response:
                assert response.status == status, (url, status)
                check(document, path, method, status, await response.json())
        async with AsyncClassifyClient(worker.url) as client:
            await client.wait("oa-1", timeout=60)
            while await client.stored_result("pets", "oa-1") is None:
                pass
        for url, path, params in [
            ("/classify/results/oa-1", "/classify/results/{ad_id}", {}),
            (
                "/classify/results",
                "/classify/results",
                {"catalog": "pets", "catalog_ad_id": "oa-1"},
            ),
            ("/classify/results", "/classify/results", {"category": "animals"}),
        ]:
            async with session.get(url, params=params) as response:
                assert response.status == 200
                check(document, path, "get", 200, await response.json())


async def test_the_clients_submit_wait_and_explain_errors(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    ad = {"ad_id": "sdk-1", "catalog_name": "kitchen", "images": [images.photo_url("coffee")]}

    def blocking() -> None:  # the sync client runs its own loop: off this test's loop
        with ClassifyClient(worker.url) as client:
            accepted = client.submit(ad)
            result = client.wait(accepted.ad_id, timeout=60, request_id=accepted.request_id)
            assert isinstance(result, ClassificationResult) and result.final
            assert result.category == "food_drink"
            assert result.images[0].labels[0].name in {"espresso", "cup"}
            assert client.result("never-sent") is None
            with pytest.raises(ClassifyError) as refused:
                client.submit({"ad_id": "x", "catalog_name": "c", "images": []})
            assert refused.value.status == 400 and refused.value.reason == "invalid_event"
            with pytest.raises(ClassifyTimeout):
                client.wait("never-sent", timeout=0.3)
        with (
            ClassifyClient(f"http://127.0.0.1:{free_port()}") as nobody,
            pytest.raises(ClassifyUnavailable),
        ):
            nobody.result("x")

    await asyncio.get_running_loop().run_in_executor(None, blocking)

    # Straight to Kafka: the worker validates and classifies it the same way.
    via_kafka = {"ad_id": "sdk-2", "catalog_name": "pets", "images": [images.photo_url("chelsea")]}
    async with AsyncClassifyClient(worker.url, kafka_bootstrap=broker.bootstrap) as client:
        accepted = await client.submit(via_kafka)
        result = await client.wait("sdk-2", timeout=60, request_id=accepted.request_id)
        assert result.category == "animals"


def cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "classify_app", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def test_every_command_of_the_command_line(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    worker = workers()
    await worker.start()
    env = {**os.environ, "CLASSIFY_BROKER": broker.url, "CLASSIFY_MONGO_URI": worker.mongo_uri}
    env["CLASSIFY_MONGO_DATABASE"] = worker.database
    url = ["--url", worker.url]

    sent = cli(
        "send", "--ad-id", "cli-1", "--catalog", "pets", "--image", images.photo_url("chelsea"),
        "--wait", "60", *url, env=env,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert "accepted cli-1" in sent.stdout and '"status": "done"' in sent.stdout

    kafka = cli(
        "send", "--json", json.dumps({"ad_id": "cli-2", "catalog_name": "c",
        "images": [images.photo_url("coffee")]}), "--kafka", "--wait", "60", *url, env=env,
    )  # fmt: skip
    assert kafka.returncode == 0, kafka.stderr
    assert '"ad_id": "cli-2"' in kafka.stdout

    lines = [
        json.dumps(
            {"ad_id": f"file-{n}", "catalog_name": "c", "images": [images.photo_url("camera")]}
        )
        for n in range(5)
    ] + ["{not json", json.dumps({"ad_id": "bad", "images": []})]
    path = tmp_path / "ads.jsonl"
    path.write_text("\n".join(lines) + "\n")
    batch = cli("send-file", str(path), "--wait", "90", *url, env=env)
    assert batch.returncode == 0, batch.stderr
    assert "5 accepted, 2 refused, invalid_event: 1, malformed_json: 1" in batch.stdout
    assert "results: done: 5" in batch.stdout
    assert "sent 7/7" in batch.stderr

    found = cli("result", "file-3", *url, env=env)
    assert found.returncode == 0 and json.loads(found.stdout)["status"] == "done"
    missing = cli("result", "nope", *url, env=env)
    assert missing.returncode == 1 and "no classification" in missing.stderr

    migrated = cli("migrate", env=env)
    assert migrated.returncode == 0 and "0 migrations applied" in migrated.stdout

    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for number in range(3):
            await producer.send_and_wait("ads", b"{broken", key=f"dl-{number}".encode())
    finally:
        await producer.stop()
    await read_topic(broker.bootstrap, "ads-dead-letter", lambda seen: len(seen) >= 3, timeout=30)
    dry = cli("dlq-replay", "--dry-run", env=env)
    assert dry.returncode == 0 and "3 dead letters to replay" in dry.stdout
    replayed = cli("dlq-replay", "--reason", "malformed_json", "--limit", "2", env=env)
    assert replayed.returncode == 0 and "2 dead letters replayed" in replayed.stdout
    rest = cli("dlq-replay", "--reason", "malformed_json", env=env)
    # The third, plus the two replayed ones that failed again and were dead-lettered again.
    assert rest.returncode == 0 and "dead letters replayed" in rest.stdout
    assert "0 dead letters replayed" not in rest.stdout

    photo = tmp_path / "cat.jpg"
    async with (
        aiohttp.ClientSession() as session,
        session.get(images.photo_url("chelsea")) as response,
    ):
        photo.write_bytes(await response.read())
    classified = cli("classify-image", str(photo), "--top-k", "3", env=env)
    assert classified.returncode == 0, classified.stderr
    assert "category animals" in classified.stdout and "tabby" in classified.stdout
    not_image = cli("classify-image", "/etc/hostname", env=env)
    assert not_image.returncode == 1 and "not_an_image" in not_image.stderr

    smoke = cli("bench", "store", "--", "--documents", "300", "--lookups", "20", "--out",
                str(tmp_path / "store.json"), env=env)  # fmt: skip
    assert smoke.returncode == 0, smoke.stderr
    assert json.loads((tmp_path / "store.json").read_text())["documents"] == 300
