"""Publish ad events the way a marketplace's ad service does: plain aiokafka, no classify-app code.

    python examples/produce_aiokafka.py --bootstrap localhost:9092 --image URL [--image URL ...]

Each event is JSON on the `ads` topic, keyed by the ad id (so every event of one ad lands on one
partition, in order). Results appear on the `results` topic and at
GET /classify/results/{ad_id} on any worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from aiokafka import AIOKafkaProducer


async def publish(bootstrap: str, topic: str, images: list[str], count: int) -> list[str]:
    """Send `count` ads with these images; returns their ad ids."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    ad_ids = []
    try:
        for _ in range(count):
            ad_id = f"example-{uuid.uuid4().hex[:8]}"
            event = {
                "ad_id": ad_id,
                "catalog_name": "examples",
                "title": "Sold by the example producer",
                "images": images,
                "updated_at": time.time(),  # orders edits of the same ad
            }
            await producer.send(topic, json.dumps(event).encode(), key=ad_id.encode())
            ad_ids.append(ad_id)
        await producer.flush()
    finally:
        await producer.stop()
    return ad_ids


def main() -> None:
    """Parse the arguments, publish, print the ad ids."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="localhost:9092")
    parser.add_argument("--topic", default="ads")
    parser.add_argument("--image", action="append", required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    for ad_id in asyncio.run(publish(args.bootstrap, args.topic, args.image, args.count)):
        print(ad_id)


if __name__ == "__main__":
    main()
