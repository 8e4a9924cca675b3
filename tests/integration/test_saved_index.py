"""A saved similarity index is loaded only onto the topic it read (through the broker): the
start tells a recreated or shorter topic from the one the save left, by the partitions, their
ends and the record the save read last. A save copied from another worker, which may have
read further than the topic's ends as the start first saw them, is loaded too."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from classify_app.dev.broker import LocalBroker
from classify_app.dev.processes import free_port
from classify_app.records import AdVectors, ImageVector
from classify_app.vectors import encode_vector
from tables.similarity import IndexFeeder, Position, SimilarityIndex, newest_save_files
from tests.tables.test_similarity_copy import peer_app

TOPIC = "vectors"


async def filled(bootstrap: str, records: int) -> list[Any]:
    """A two-partition topic with `records` records in partition 0; their metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(TOPIC, b"{}", key=f"ad-{n}".encode(), partition=0)
            for n in range(records)
        ]
    finally:
        await producer.stop()
    return sent


async def misfit(bootstrap: str, saved: dict[int, Position]) -> str | None:
    feeder = IndexFeeder(SimilarityIndex(4), topic=TOPIC, bootstrap=bootstrap, options={})
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
        consumer.assign(assigned)
        return await feeder._misfit(consumer, saved, await consumer.end_offsets(assigned))
    finally:
        await consumer.stop()


async def test_a_save_fits_only_the_topic_it_read(broker: LocalBroker) -> None:
    sent = await filled(broker.bootstrap, 3)
    last = sent[-1]
    assert (last.offset, last.timestamp > 0) == (2, True)
    # What the save read: all of partition 0, nothing of partition 1.
    assert await misfit(broker.bootstrap, {0: (3, last.timestamp), 1: (0, -1)}) is None
    assert await misfit(broker.bootstrap, {0: (2, sent[1].timestamp)}) is None  # behind: fine
    # A topic of the same name made again: the record the save read last is another.
    changed = await misfit(broker.bootstrap, {0: (3, last.timestamp - 1)})
    assert changed == "the record at offset 2 of partition 0 changed"
    shorter = await misfit(broker.bootstrap, {0: (5, last.timestamp)})
    assert shorter == "partition 0 ends at 3, the save read 5"
    assert await misfit(broker.bootstrap, {7: (1, 0)}) == "partition 7 is gone"


async def test_a_copied_save_that_read_further_than_the_start_saw_is_loaded(
    broker: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await filled(broker.bootstrap, 3)
    peer_folder = tmp_path / "peer"

    async def manifest(request: web.Request) -> web.Response:
        # The peer has read two records more than the topic held when the start read its
        # ends, and saved since: the copy's positions are past those ends.
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            last = [
                await producer.send_and_wait(TOPIC, b"{}", key=b"late", partition=0)
                for _ in range(2)
            ][-1]
        finally:
            await producer.stop()
        index = SimilarityIndex(4)
        vector = encode_vector(np.array([1, 0, 0, 0], dtype=np.float32))
        images = [ImageVector(index=0, vector=vector)]
        held = AdVectors(
            ad_id="held", request_id="r", catalog_name="c", version=1.0, submitted_at=1.0,
            images=images,
        )  # fmt: skip
        index.put(held)
        index.save(peer_folder, {0: (last.offset + 1, last.timestamp), 1: (0, -1)})
        found = newest_save_files(peer_folder)
        assert found is not None
        files = [{"name": path.name, "bytes": path.stat().st_size} for path in found[1]]
        return web.json_response({"save": found[0], "files": files})

    runner = web.AppRunner(peer_app(peer_folder, manifest), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    feeder = IndexFeeder(
        SimilarityIndex(4),
        topic=TOPIC,
        bootstrap=broker.bootstrap,
        options={},
        save_folder=tmp_path / "mine",
        peers=lambda: [f"http://127.0.0.1:{port}"],
    )
    caplog.set_level(logging.INFO, logger="tables.similarity")
    try:
        await feeder.start()
        await asyncio.wait_for(feeder.caught_up.wait(), timeout=30)
    finally:
        await feeder.stop()
        await runner.cleanup()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Similarity index copied from" in logged and "rebuilding" not in logged, logged
    assert feeder.index.vectors_of("held") is not None  # what only the copy held
    assert feeder.records == 0  # nothing after the copy's positions to read
