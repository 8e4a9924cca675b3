"""MongoDB store benchmark: bulk upsert throughput and lookup latency, through `tables/store.py`.

    python bench/store.py [--mongo-uri URI] [--documents 100000] [--bulk 500]
                          [--lookups 2000] [--out FILE]

Without `--mongo-uri` it starts a local SecantusDB server (a MongoDB-protocol server) on a
temporary directory. Fills a fresh database with `--documents` finished ad results (two images
each, as the worker writes them), reports upserts/s for first writes and for replays of the
same results, then the p50/p99 latency of `--lookups` random lookups by ad id, by catalog key,
and, for contrast, by a field that has no index (the original service's 25-second lookup).
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from classify_app.dev.mongo import running_mongo
from classify_app.records import AdResult, ImageResult, Label
from tables.migrations import migrate
from tables.store import ResultStore

CATEGORIES = ["vehicles", "animals", "food_drink", "electronics", "home_garden", "fashion"]


def ad_result(number: int) -> AdResult:
    """A realistic finished result: two classified images, five labels each."""
    category = CATEGORIES[number % len(CATEGORIES)]
    scores = {name: round(0.9 if name == category else 0.02, 5) for name in CATEGORIES}
    images = [
        ImageResult(
            index=index,
            url=f"https://img.example.com/ads/{number}/{index}.jpg",
            status="done",
            labels=[Label(name=f"label-{k}", score=round(0.9 / (k + 1), 5)) for k in range(5)],
            category=category,
            category_scores=scores,
            timings={"download_seconds": 0.05, "inference_seconds": 0.03, "batch_size": 16},
        )
        for index in range(2)
    ]
    now = time.time()
    return AdResult(
        ad_id=f"ad-{number}",
        request_id=uuid.uuid4().hex[:24],
        catalog_name="cars" if number % 2 else "pets",
        catalog_ad_id=f"c-{number}",
        status="done",
        image_count=2,
        images=images,
        category=category,
        category_scores=scores,
        model="efficientnet-lite0",
        model_version="tf-imagenet-75.1",
        version=now,
        submitted_at=now,
        accepted_at=now,
        completed_at=now + 0.2,
        latency_seconds=0.2,
    )


async def upsert_rate(
    store: ResultStore, make: Callable[[int], AdResult], count: int, bulk: int
) -> float:
    """Documents/s writing results 0..count-1 in bulks of `bulk`, one bulk at a time (as the
    writer does); prints the rate of every 10,000, to show whether it holds as data grows.
    Only the writes are timed, not building the results."""
    total = lap = 0.0
    for first in range(0, count, bulk):
        results = [make(number) for number in range(first, min(count, first + bulk))]
        started = time.perf_counter()
        await store.upsert_many(results)
        seconds = time.perf_counter() - started
        total += seconds
        lap += seconds
        if (first + bulk) % 10_000 == 0:
            print(f"  {first + bulk:>7,} documents: {10_000 / lap:,.0f} upserts/s", flush=True)
            lap = 0.0
    return count / total


async def latencies_ms(lookup: Callable[[int], Awaitable[Any]], count: int, size: int) -> dict:
    """p50/p99 of `count` sequential lookups of random documents."""
    rng = random.Random(7)
    samples = []
    for _ in range(count):
        number = rng.randrange(size)
        started = time.perf_counter()
        found = await lookup(number)
        samples.append((time.perf_counter() - started) * 1000)
        assert found is not None, number
    samples.sort()
    return {
        "lookups": count,
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 3),
    }


async def measure(uri: str, documents: int, bulk: int, lookups: int) -> dict:
    """Run every measurement against a fresh database at `uri`."""
    store = ResultStore(uri, f"bench_{uuid.uuid4().hex[:8]}", "ad_results", timeout_s=30)
    try:
        await migrate(store)
        made: dict[int, AdResult] = {}

        def make(number: int) -> AdResult:
            made[number] = ad_result(number)
            return made[number]

        first_writes = await upsert_rate(store, make, documents, bulk)
        replays = await upsert_rate(store, made.__getitem__, min(documents, 20_000), bulk)
        count = await store.results.count_documents({})
        assert count == documents, count
        by_request = {number: result.request_id for number, result in made.items()}
        unindexed = min(lookups, 20)
        return {
            "documents": documents,
            "bulk_size": bulk,
            "first_write_upserts_per_s": round(first_writes),
            "replay_upserts_per_s": round(replays),
            "lookup_by_ad_id": await latencies_ms(
                lambda n: store.find(f"ad-{n}"), lookups, documents
            ),
            "lookup_by_catalog_key": await latencies_ms(
                lambda n: store.find_by_catalog("cars" if n % 2 else "pets", f"c-{n}"),
                lookups,
                documents,
            ),
            "lookup_unindexed_field": await latencies_ms(
                lambda n: store.results.find_one({"request_id": by_request[n]}),
                unindexed,
                documents,
            ),
        }
    finally:
        await store.database.client.drop_database(store.database_name)
        await store.close()


def main() -> None:
    """Run the benchmark, print a table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mongo-uri", default="", help="default: start a local SecantusDB")
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--bulk", type=int, default=500)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--out", default="bench-results/store.json")
    args = parser.parse_args()

    if args.mongo_uri:
        server = "given"
        numbers = asyncio.run(measure(args.mongo_uri, args.documents, args.bulk, args.lookups))
    else:
        server = "SecantusDB 0.7.0b3 (local process)"
        with running_mongo(Path(tempfile.mkdtemp(prefix="bench-mongo-")) / "data") as mongo:
            numbers = asyncio.run(measure(mongo.uri, args.documents, args.bulk, args.lookups))
    numbers = {"machine": platform.processor() or platform.machine(), "server": server, **numbers}

    print(f"{numbers['documents']:,} documents, bulks of {numbers['bulk_size']} ({server})")
    print(f"  first writes  {numbers['first_write_upserts_per_s']:>8,} upserts/s")
    print(f"  replays       {numbers['replay_upserts_per_s']:>8,} upserts/s")
    for name in ("lookup_by_ad_id", "lookup_by_catalog_key", "lookup_unindexed_field"):
        row = numbers[name]
        print(f"  {name:<24} p50 {row['p50_ms']:>9.2f} ms  p99 {row['p99_ms']:>9.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(numbers, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
