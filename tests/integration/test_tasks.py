"""Model tasks through the broker: a worker classifies ads into a marketplace's own
categories with a head trained by `train-head`; a head for another backbone stops a worker at
start; a worker running every task gives every output, moderates and flags, and a task that
raises on one image costs that output only."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from classify_app.dev.labelled import labelled_folder
from models.heads import LinearHead
from models.tasks import decode_embedding
from tests.support.tasks import RAISE
from tests.support.workers import PlannedAd, Worker, consume_results, produce, wait_for_results

ROOT = Path(__file__).resolve().parents[2]


def train(folder: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "classify_app", "train-head", "--images", str(folder),
         "--out", str(out), "--augment", "1"],
        env={**os.environ, "CLASSIFY_MONGO_URI": ""},
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


async def test_a_worker_with_a_trained_head_sorts_ads_into_those_categories(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    folder, held = labelled_folder(tmp_path / "photos", held_per_source=2)
    head_path = tmp_path / "head.safetensors"
    train(folder, head_path)
    head = LinearHead.load(head_path)

    ads, truth = [], {}
    for category, photos in held.items():
        for number, photo in enumerate(photos):
            ad_id = f"own-{category}-{number}"
            url = images.add_photo(f"held-{category}-{number}", photo)
            ads.append(PlannedAd({"ad_id": ad_id, "catalog_name": "shop", "images": [url]}))
            truth[ad_id] = category
    worker = workers(env={"CLASSIFY_HEAD": str(head_path)})
    await worker.start()
    await produce(broker.bootstrap, ads)
    results = await wait_for_results(worker.url, ads, timeout=90)

    right = sum(results[ad_id]["category"] == category for ad_id, category in truth.items())
    assert right / len(truth) >= 0.8, {ad_id: r["category"] for ad_id, r in results.items()}
    for result in results.values():
        assert result["status"] == "done"
        assert head.version in result["model_version"]
        assert set(result["category_scores"]) == set(head.categories)
        [image] = result["images"]
        assert image["outputs"]["category"]["version"] == head.version
        assert image["labels"]  # the backbone's ImageNet labels stay


async def test_a_head_for_another_backbone_stops_the_worker_at_start(
    broker: LocalBroker, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    folder, _ = labelled_folder(tmp_path / "photos", per_source=2, held_per_source=0)
    head_path = tmp_path / "head.safetensors"
    train(folder, head_path)
    head = LinearHead.load(head_path)
    other = tmp_path / "other.safetensors"
    LinearHead(**{**head.__dict__, "backbone": "convnext-tiny", "backbone_version": "1"}).save(
        other
    )
    worker = workers(env={"CLASSIFY_HEAD": str(other)})
    process = worker.launch()
    assert process.wait(timeout=120) == 4
    log = worker.log_tail()
    assert "cannot make its model tasks" in log and "trained on convnext-tiny 1" in log


async def test_every_task_on_one_pass_moderates_flags_and_isolates_a_failure(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers(
        env={
            "CLASSIFY_TASKS": "category,embedding,moderation,tests.support.tasks:PriceBand",
            "CLASSIFY_MODERATION_THRESHOLDS": "0.8,strict=0.0",
            "PYTHONPATH": str(ROOT),
        }
    )
    await worker.start()
    photos = ["coffee", "chelsea", "camera", "motorcycle", "rocket", "astronaut"]

    def ad(ad_id: str, catalog: str, title: str) -> PlannedAd:
        urls = [images.photo_url(name) for name in photos]
        event = {"ad_id": ad_id, "catalog_name": catalog, "images": urls, "title": title,
                 "price": 1450.0}  # fmt: skip
        return PlannedAd(event, photos=dict(enumerate(photos)))

    ads = [
        ad("tasks-safe", "general", "Six photos"),
        ad("tasks-strict", "strict", "Six photos"),  # threshold 0: the flag path
        ad("tasks-raise", "general", f"please {RAISE}"),
    ]
    await produce(broker.bootstrap, ads)
    results = await wait_for_results(worker.url, ads, timeout=120)
    published = {
        record["ad_id"]: record
        for record in await consume_results(broker.bootstrap, {a.ad_id for a in ads}, 60)
    }

    safe, strict, raised = (results[a.ad_id] for a in ads)
    for result in (safe, strict, raised):
        assert result["status"] == "done", result
    for image in safe["images"]:
        outputs = image["outputs"]
        assert set(outputs) == {"category", "embedding", "moderation", "price_band"}
        assert outputs["moderation"]["nsfw_score"] < 0.8 and outputs["moderation"]["flags"] == []
        assert outputs["embedding"]["dim"] == 1280 and "vector" not in outputs["embedding"]
        assert outputs["price_band"] == {"task": "price_band", "version": "bands-1",
                                         "band": "high", "title_words": 2}  # fmt: skip
        assert outputs["category"]["category"] == image["category"]
    assert safe["flags"] == [] and strict["flags"] == ["nsfw"]
    assert all(image["outputs"]["moderation"]["flags"] == ["nsfw"] for image in strict["images"])

    # The task that raised failed its own output on each image of that ad, nothing else.
    for image in raised["images"]:
        assert image["status"] == "done" and image["labels"]
        assert image["outputs"]["price_band"]["error"]["reason"] == "task_error"
        assert (
            "the title asked this task to fail"
            in image["outputs"]["price_band"]["error"]["message"]
        )
        assert image["outputs"]["moderation"]["nsfw_score"] < 0.8
    assert raised["category"] == safe["category"]

    # `results` carries the vectors; the API gives them when asked.
    [first] = [i for i in published["tasks-safe"]["images"] if i["index"] == 0]
    vector = decode_embedding(first["outputs"]["embedding"])
    assert vector.shape == (1280,) and abs(float(vector @ vector) - 1) < 1e-2
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{worker.url}/classify/results/tasks-safe?embeddings=true") as response,
    ):
        asked = await response.json()
    assert (
        asked["images"][0]["outputs"]["embedding"]["vector"]
        == first["outputs"]["embedding"]["vector"]
    )
