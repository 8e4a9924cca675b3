"""The quick start: an embedded broker, a worker, sample ads, and their results over HTTP.

    python -m classify_app.dev.quickstart [--once]

Starts a local Tansu broker, a MongoDB-protocol server (SecantusDB), a server of sample
photos and one worker; submits a few ads (some with broken images) through `POST /classify`;
prints each result fetched from `GET /classify/results/{ad_id}`. Then it keeps everything
running for you to try the API, until Ctrl-C (or exits at once with `--once`). Stopping it
stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from classify_app.dev.broker import running_broker
from classify_app.dev.images import SampleImageServer, serving_images
from classify_app.dev.mongo import running_mongo
from classify_app.dev.processes import free_port, start_worker, stop_process, wait_until_ready
from classify_app.sdk import AsyncClassifyClient


def sample_ads(images: SampleImageServer) -> list[dict[str, Any]]:
    """A handful of ads as a marketplace would send them, two with broken images."""
    return [
        {"ad_id": "demo-1", "catalog_name": "kitchen", "images": [images.photo_url("coffee")]},
        {
            "ad_id": "demo-2",
            "catalog_name": "pets",
            "title": "Lovely cat looking for a home",
            "images": [images.photo_url("chelsea")],
        },
        {
            "ad_id": "demo-3",
            "catalog_name": "vehicles",
            "price": 1450.0,
            "images": [images.photo_url("motorcycle"), f"{images.url}/status/404"],
        },
        {
            "ad_id": "demo-4",
            "catalog_name": "photo",
            "images": [images.photo_url("camera"), f"{images.url}/truncated.jpg"],
        },
        {"ad_id": "demo-5", "catalog_name": "misc", "images": [f"{images.url}/html-as-jpeg"]},
    ]


def describe(result: dict[str, Any]) -> str:
    """One ad's result as a few readable lines."""
    lines = [
        f"{result['ad_id']}: {result['status']}, category {result['category']}, "
        f"{result['latency_seconds']:.3f} s end to end"
    ]
    for image in result["images"]:
        if image["status"] == "done":
            top = ", ".join(
                f"{label['name']} {label['score']:.0%}" for label in image["labels"][:3]
            )
            lines.append(f"    image {image['index']}: {image['category']:<14} {top}")
        else:
            error = image["error"]
            lines.append(f"    image {image['index']}: {error['reason']:<14} {error['message']}")
    return "\n".join(lines)


async def demo(web_url: str, images: SampleImageServer) -> None:
    """Submit the sample ads and print their results."""
    async with AsyncClassifyClient(web_url) as client:
        accepted = [await client.submit(ad) for ad in sample_ads(images)]
        print(f"Submitted {len(accepted)} ads with POST {web_url}/classify; results:\n")
        for acceptance in accepted:
            result = await client.wait(acceptance.ad_id, timeout=60)
            print(describe(result.raw))
        deadline = time.monotonic() + 10
        while (stored := await client.stored_result("pets", "demo-2")) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("demo-2 did not reach MongoDB within 10 s")
            await asyncio.sleep(0.1)
        print(
            f"\nIn MongoDB: GET /classify/results?catalog=pets&catalog_ad_id=demo-2 -> "
            f"{stored.ad_id} {stored.status}, category {stored.category}"
        )


async def wait_for_stop() -> None:
    """Return on Ctrl-C or SIGTERM."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()


def main() -> None:
    """Run the quick start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after printing the results")
    parser.add_argument("--web-port", type=int, default=0, help="worker HTTP port (default: free)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="classify-quickstart-"))
    web_port = args.web_port or free_port()
    web_url = f"http://127.0.0.1:{web_port}"
    started = time.monotonic()
    with (
        running_broker() as broker,
        running_mongo(workdir / "mongo") as mongo,
        serving_images() as images,
    ):
        print(
            f"Broker (Tansu) on {broker.bootstrap}, MongoDB (SecantusDB) at {mongo.uri}, "
            f"started in {time.monotonic() - started:.1f} s"
        )
        print(f"Sample photos served at {images.url}/photos/")
        worker = start_worker(
            broker.url,
            workdir / "data",
            web_port,
            log_path=workdir / "worker.log",
            mongo_uri=mongo.uri,
        )
        print(f"Worker starting (log: {workdir / 'worker.log'}) ...")
        try:
            ready = asyncio.run(wait_until_ready(web_url))
            print(f"Worker ready at {web_url} after {ready:.1f} s\n")
            asyncio.run(demo(web_url, images))
            if not args.once:
                print(
                    f"\nThe service is running: curl {web_url}/classify/results/demo-1\n"
                    f"From MongoDB: curl '{web_url}/classify/results?catalog=pets"
                    "&catalog_ad_id=demo-2'\n"
                    "Press Ctrl-C to stop the worker, the image server, MongoDB and the broker."
                )
                asyncio.run(wait_for_stop())
        finally:
            stop_process(worker)
    print("Stopped the worker, the image server, MongoDB and the broker.")


if __name__ == "__main__":
    main()
