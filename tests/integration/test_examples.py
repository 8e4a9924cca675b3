"""The examples in examples/ work against a real broker and worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer, sample_photo_jpeg
from classify_app.sdk import AsyncClassifyClient
from tests.support.workers import Worker

EXAMPLES = Path(__file__).parents[2] / "examples"


def run(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


async def test_the_aiokafka_producer_example(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    worker = workers()
    await worker.start()
    output = run(
        "produce_aiokafka.py",
        "--bootstrap",
        broker.bootstrap,
        "--image",
        images.photo_url("motorcycle"),
        "--count",
        "2",
    )
    ad_ids = output.split()
    assert len(ad_ids) == 2
    async with AsyncClassifyClient(worker.url) as client:
        for ad_id in ad_ids:
            assert (await client.wait(ad_id, timeout=60)).category == "vehicles"


async def test_the_folder_example(workers: Callable[..., Worker], tmp_path: Path) -> None:
    worker = workers()
    await worker.start()
    for name in ("coffee", "chelsea"):
        (tmp_path / f"{name}.jpg").write_bytes(sample_photo_jpeg(name))
    (tmp_path / "notes.txt").write_text("not a photo, skipped")
    (tmp_path / "broken.jpg").write_bytes(b"<html>not really</html>")
    lines = run("classify_folder.py", str(tmp_path), "--url", worker.url).splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines}
    assert set(table) == {"broken.jpg", "chelsea.jpg", "coffee.jpg"}
    assert table["coffee.jpg"][:2] == ["done", "food_drink"]
    assert table["chelsea.jpg"][:2] == ["done", "animals"]
    assert table["broken.jpg"] == ["failed", "-", "not_an_image"]
