"""Soak: one worker under a steady stream for minutes; does its memory stay flat?

    python bench/soak.py [--minutes 10] [--rate 10] [--out FILE]

Starts the local broker, MongoDB (SecantusDB), the image server and one worker, then produces
`--rate` ads/s (1-3 images, about 10 % of them broken in the usual ways) for `--minutes`.
Every 10 s it samples the worker's RSS, CPU and how many ads are final; at the end it checks
that every ad is final and stored in MongoDB. Prints the RSS curve (start, max, end, and the
slope over the second half) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from metering import metered_worker
from pymongo import AsyncMongoClient

from classify_app.dev.broker import running_broker
from classify_app.dev.images import SAMPLE_PHOTOS, SampleImageServer, serving_images
from classify_app.dev.mongo import running_mongo
from classify_app.dev.processes import wait_until_ready

BROKEN = ("/status/404", "/html-as-jpeg", "/truncated.jpg", "/bomb.png")
SAMPLE_SECONDS = 10.0


def ad_event(number: int, images: SampleImageServer, rng: random.Random) -> dict:
    """An ad of 1-3 images, about 10 % of them broken."""
    urls = [
        images.url + rng.choice(BROKEN)
        if rng.random() < 0.1
        else images.photo_url(rng.choice(sorted(SAMPLE_PHOTOS)))
        for _ in range(rng.randint(1, 3))
    ]
    return {"ad_id": f"soak-{number}", "catalog_name": "soak", "images": urls}


async def soak(args: argparse.Namespace) -> dict:
    """Run the soak; returns the samples and the summary."""
    workdir = Path(tempfile.mkdtemp(prefix="classify-soak-"))
    with (
        running_broker() as broker,
        running_mongo(workdir / "mongo") as mongo,
        serving_images() as images,
        metered_worker(broker.url, workdir, mongo_uri=mongo.uri) as worker,
    ):
        meter = worker.meter
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo.uri)
        database = client.classify
        await wait_until_ready(worker.url)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
        await producer.start()
        rng = random.Random(5)
        samples = []
        started = time.monotonic()
        next_sample = started
        sent = 0
        cpu_before = meter.cpu_seconds()
        try:
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                while sent < elapsed * args.rate:
                    event = ad_event(sent, images, rng)
                    await producer.send(
                        "ads", json.dumps(event).encode(), key=event["ad_id"].encode()
                    )
                    sent += 1
                if time.monotonic() >= next_sample:
                    stored = await database.ad_results.count_documents({})
                    samples.append(
                        {
                            "seconds": round(elapsed, 1),
                            "rss_mb": round(meter.rss_mb(), 1),
                            "cpu_percent": round(
                                100 * (meter.cpu_seconds() - cpu_before) / SAMPLE_SECONDS
                            ),
                            "ads_sent": sent,
                            "ads_stored": stored,
                        }
                    )
                    cpu_before = meter.cpu_seconds()
                    print(samples[-1], flush=True)
                    next_sample += SAMPLE_SECONDS
                await asyncio.sleep(0.02)
            await producer.flush()
        finally:
            await producer.stop()
        deadline = time.monotonic() + 300
        while (stored := await database.ad_results.count_documents({})) < sent:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
    rss = [sample["rss_mb"] for sample in samples]
    second_half = samples[len(samples) // 2 :]
    slope = (
        statistics.linear_regression(
            [s["seconds"] for s in second_half], [s["rss_mb"] for s in second_half]
        ).slope
        * 60
        if len(second_half) > 1
        else 0.0
    )
    return {
        "minutes": args.minutes,
        "rate_ads_per_second": args.rate,
        "ads_sent": sent,
        "ads_stored": stored,
        "rss_start_mb": rss[0],
        "rss_max_mb": max(rss),
        "rss_end_mb": rss[-1],
        "rss_slope_second_half_mb_per_minute": round(slope, 2),
        "samples": samples,
        "worker_log": str(worker.log_path),
    }


def main() -> None:
    """Run the soak, print the curve's summary and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--out", default="bench-results/soak.json")
    args = parser.parse_args()
    numbers = asyncio.run(soak(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(numbers, indent=2))
    print(
        f"{numbers['ads_sent']} ads in {numbers['minutes']:g} min at {args.rate:g} ads/s, "
        f"{numbers['ads_stored']} stored; RSS start {numbers['rss_start_mb']:.0f} MB, "
        f"max {numbers['rss_max_mb']:.0f} MB, end {numbers['rss_end_mb']:.0f} MB, "
        f"second-half slope {numbers['rss_slope_second_half_mb_per_minute']:+.1f} MB/min"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
