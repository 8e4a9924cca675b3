"""Hostile soak: one worker under a steady stream in which at least a tenth of the events and
images are hostile; does it keep going, with bounded memory and a reason for each?

    python bench/hostile_soak.py [--minutes 10] [--rate 8] [--out FILE]

Starts the local broker, MongoDB, the image server and one worker, and produces `--rate`
ads/s for `--minutes`: honest ads of 1-3 photos, hostile events (malformed, deeply nested,
huge numbers, lone surrogates, oversized, far-future times, unknown fields, not UTF-8) and
ads with hostile images (errors, HTML, truncated, decompression bombs, 100 MB answers,
animations of 1,000 frames, absurd shapes, 30 MP of 16-bit pixels, redirects into the cloud
metadata service and to no URL, private addresses in IPv4 and IPv6 forms). Every 10 s it
samples the worker's RSS; at the end it checks that every valid ad is stored, every hostile
event dead-lettered, and prints the reason each hostile input got, and the worker's
restarts (its process must be the one it started).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from metering import metered_worker
from pymongo import AsyncMongoClient

from classify_app.dev.broker import running_broker
from classify_app.dev.images import SAMPLE_PHOTOS, SampleImageServer, serving_images
from classify_app.dev.mongo import running_mongo
from classify_app.dev.processes import wait_until_ready

SAMPLE_SECONDS = 10.0
OK = '{"ad_id": "%s", "catalog_name": "soak", "images": ["%s"]'
# Hostile events: each is dead-lettered with the reason it must get.
HOSTILE_EVENTS: dict[str, tuple[str, Any]] = {
    "malformed": ("malformed_json", lambda ad, url: b'{"ad_id": "' + ad.encode()),
    "nested": ("malformed_json", lambda ad, url: b"[" * 60_000 + b"]" * 60_000),
    "huge_int": ("malformed_json", lambda ad, url: b'{"ad_id": ' + b"9" * 5000 + b"}"),
    "price_overflow": (
        "invalid_event",
        lambda ad, url: (OK % (ad, url) + ', "price": 1' + "0" * 400 + "}").encode(),
    ),
    "surrogate": (
        "invalid_event",
        lambda ad, url: (OK % (ad, url) + ', "title": "\\ud800"}').encode(),
    ),
    "oversized": (
        "event_too_large",
        lambda ad, url: (OK % (ad, url) + ', "event_id": "' + "e" * 300_000 + '"}').encode(),
    ),
    "many_urls": (
        "event_too_large",
        lambda ad, url: json.dumps({"ad_id": ad, "images": ["\u00e9"] * 60_000}).encode(),
    ),
    "far_future": (
        "invalid_event",
        lambda ad, url: (OK % (ad, url) + ', "updated_at": 1e300}').encode(),
    ),
    "not_utf8": ("malformed_json", lambda ad, url: b'{"ad_id": "\xff\xfe"}'),
    "too_many_images": (
        "too_many_images",
        lambda ad, url: json.dumps(
            {"ad_id": ad, "catalog_name": "s", "images": [url] * 30}
        ).encode(),
    ),
}
# Events with fields nothing reads are classified (the tolerant reader), not refused.
TOLERATED = {"unknown_field": lambda ad, url: (OK % (ad, url) + ', "x": {"y": [1, 2]}}').encode()}
# Hostile images (paths on the image server, or URLs): the reason each must get.
HOSTILE_IMAGES: dict[str, str | None] = {
    "/status/404": "http_404",
    "/html-as-jpeg": "not_an_image",
    "/truncated.jpg": "corrupt_image",
    "/bomb.png": "too_many_pixels",
    "/huge": "too_large",
    "/frames.gif": None,  # classified from its first frame
    "/strip.png": "extreme_aspect_ratio",
    "/deep.png": None,  # decoded within the memory budget
    "/bad-redirect": "invalid_url",
    "/redirect?to=http://169.254.169.254/latest/meta-data/": "forbidden_address",
    "http://10.0.0.1/a.jpg": "forbidden_address",
    "http://[64:ff9b::a9fe:a9fe]/a.jpg": "forbidden_address",
    "http://[::ffff:192.168.0.1]/a.jpg": "forbidden_address",
    "file:///etc/passwd": "unsupported_scheme",
}


def plan(number: int, images: SampleImageServer, rng: random.Random) -> dict[str, Any]:
    """One event: 80 % honest ads, 10 % hostile events, 10 % ads with a hostile image."""
    ad_id = f"hs-{number}"
    roll = rng.random()
    photo = images.photo_url(rng.choice(sorted(SAMPLE_PHOTOS)))
    if roll < 0.1:
        hostile = rng.choice(sorted(HOSTILE_EVENTS))
        reason, make = HOSTILE_EVENTS[hostile]
        return {"ad_id": ad_id, "kind": hostile, "raw": make(ad_id, photo), "dead_letter": reason}
    urls = [images.photo_url(rng.choice(sorted(SAMPLE_PHOTOS))) for _ in range(rng.randint(1, 3))]
    kind: str | None = None
    if roll < 0.12:
        return {
            "ad_id": ad_id,
            "kind": None,
            "raw": TOLERATED["unknown_field"](ad_id, photo),
            "dead_letter": None,
        }
    if roll < 0.2:
        kind = rng.choice(sorted(HOSTILE_IMAGES))
        urls[0] = images.url + kind if kind.startswith("/") else kind
    event = {"ad_id": ad_id, "catalog_name": "soak", "images": urls}
    return {"ad_id": ad_id, "kind": kind, "raw": json.dumps(event).encode(), "dead_letter": None}


async def dead_letters(bootstrap: str, expected: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        "ads-dead-letter", bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    letters: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while len(letters) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            letters += [json.loads(r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return letters


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; returns the samples and the summary."""
    workdir = Path(tempfile.mkdtemp(prefix="classify-hostile-"))
    with (
        running_broker() as broker,
        running_mongo(workdir / "mongo") as mongo,
        serving_images() as images,
        metered_worker(broker.url, workdir, mongo_uri=mongo.uri) as worker,
    ):
        meter = worker.meter
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo.uri)
        database = client.classify
        await wait_until_ready(worker.url)
        ready_rss = meter.rss_mb()
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, linger_ms=5, max_request_size=2_000_000
        )
        await producer.start()
        rng = random.Random(13)
        planned: list[dict[str, Any]] = []
        samples = []
        started = time.monotonic()
        next_sample = started
        try:
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                while len(planned) < elapsed * args.rate:
                    event = plan(len(planned), images, rng)
                    await producer.send("ads", event["raw"], key=event["ad_id"].encode())
                    planned.append(event)
                if time.monotonic() >= next_sample:
                    samples.append(
                        {
                            "seconds": round(elapsed, 1),
                            "rss_mb": round(meter.rss_mb(), 1),
                            "ads_sent": len(planned),
                            "ads_stored": await database.ad_results.count_documents({}),
                        }
                    )
                    print(samples[-1], flush=True)
                    next_sample += SAMPLE_SECONDS
                await asyncio.sleep(0.02)
            await producer.flush()
        finally:
            await producer.stop()
        valid = [event for event in planned if event["dead_letter"] is None]
        deadline = time.monotonic() + 300
        while (stored := await database.ad_results.count_documents({})) < len(valid):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        expected_letters = len(planned) - len(valid)
        letters = await dead_letters(broker.bootstrap, expected_letters)
        documents = {
            document["_id"]: document
            async for document in database.ad_results.find(
                {"_id": {"$in": [event["ad_id"] for event in valid if event["kind"]]}}
            )
        }
        end_rss = meter.rss_mb()
        alive = worker.meter.pid_alive()
        await client.close()

    reasons: dict[str, Counter[str]] = {}
    wrong: list[str] = []
    for event in valid:
        if event["kind"] is None:
            continue
        document = documents.get(event["ad_id"])
        got = "missing" if document is None else _first_image_reason(document)
        reasons.setdefault(f"image: {event['kind']}", Counter())[got] += 1
        if got != (HOSTILE_IMAGES[event["kind"]] or "done"):
            wrong.append(f"image {event['kind']}: {got}")
    letter_reason = {letter["key"]: letter["reason"] for letter in letters}
    for event in planned:
        if event["dead_letter"]:
            got = letter_reason.get(event["ad_id"], "missing")
            reasons.setdefault(f"event: {event['kind']}", Counter())[got] += 1
            if got != event["dead_letter"]:
                wrong.append(f"event {event['kind']}: {got}")
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
        "sent": len(planned),
        "valid": len(valid),
        "stored": stored,
        "hostile_events": expected_letters,
        "dead_lettered": len(letters),
        "dead_letters_by_reason": dict(Counter(letter["reason"] for letter in letters)),
        "hostile_images": sum(1 for event in valid if event["kind"]),
        "image_reasons": {kind: dict(counter) for kind, counter in sorted(reasons.items())},
        "wrong_reasons": wrong,
        "worker_restarts": 0 if alive else 1,
        "rss_ready_mb": round(ready_rss),
        "rss_end_mb": round(end_rss),
        "rss_max_mb": max(rss) if rss else None,
        "rss_slope_second_half_mb_per_minute": round(slope, 2),
        "samples": samples,
        "worker_log": str(worker.log_path),
    }


def _first_image_reason(document: dict[str, Any]) -> str:
    image = document["images"][0]
    return "done" if image["status"] == "done" else image["error"]["reason"]


def main() -> None:
    """Run the soak, print the summary and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--out", default="bench-results/hostile_soak.json")
    args = parser.parse_args()
    numbers = asyncio.run(soak(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(numbers, indent=2))
    print(
        f"{numbers['sent']} events in {numbers['minutes']:g} min at {args.rate:g}/s: "
        f"{numbers['valid']} valid, {numbers['stored']} stored; {numbers['hostile_events']} "
        f"hostile events, {numbers['dead_lettered']} dead-lettered "
        f"{numbers['dead_letters_by_reason']}; {numbers['hostile_images']} hostile images"
    )
    for kind, counts in numbers["image_reasons"].items():
        print(f"  {kind:60} {counts}")
    print(f"wrong reasons: {numbers['wrong_reasons'] or 'none'}")
    print(
        f"worker restarts {numbers['worker_restarts']}; RSS ready {numbers['rss_ready_mb']} MB, "
        f"max {numbers['rss_max_mb']:.0f} MB, end {numbers['rss_end_mb']} MB, second-half "
        f"slope {numbers['rss_slope_second_half_mb_per_minute']:+.1f} MB/min"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
