"""Replaying the dead-letter topic through the real broker: a replay of one reason leaves the
letters of every other reason for later, and nothing is replayed twice."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer

from classify_app.commands.operations import replay_dead_letters
from classify_app.dev.broker import LocalBroker
from classify_app.records import DeadLetter
from tests.support.workers import read_topic


def letter(number: int, reason: str) -> bytes:
    return json.dumps(
        DeadLetter(
            reason=reason,
            message="m",
            topic="replayed",
            partition=0,
            offset=number,
            payload=json.dumps({"n": number}),
            failed_at=1.0,
            stage="download",
        ).asdict()
    ).encode()


async def test_a_replay_of_one_reason_leaves_the_others_for_later(broker: LocalBroker) -> None:
    reasons = ["malformed_json", "invalid_event", "malformed_json", "store_rejected"] * 3
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for number, reason in enumerate(reasons):
            await producer.send_and_wait(
                "ads-dead-letter", letter(number, reason), key=f"k{number}".encode()
            )
    finally:
        await producer.stop()

    replayed, _ = await replay_dead_letters(
        broker.bootstrap, "ads-dead-letter", reason="invalid_event"
    )
    assert sorted(letter.offset for letter in replayed) == [1, 5, 9]
    # Before: the first replay committed past every letter, so this one found nothing.
    replayed, _ = await replay_dead_letters(
        broker.bootstrap, "ads-dead-letter", reason="malformed_json"
    )
    assert sorted(letter.offset for letter in replayed) == [0, 2, 4, 6, 8, 10]
    again, _ = await replay_dead_letters(
        broker.bootstrap, "ads-dead-letter", reason="malformed_json"
    )
    assert again == []
    # A replay of all reasons replays only what no replay has taken yet.
    rest, skipped = await replay_dead_letters(broker.bootstrap, "ads-dead-letter")
    assert sorted(letter.offset for letter in rest) == [3, 7, 11] and skipped == 9
    assert (await replay_dead_letters(broker.bootstrap, "ads-dead-letter"))[0] == []

    published = await read_topic(broker.bootstrap, "replayed", lambda seen: len(seen) >= 12, 30)
    assert sorted(record["n"] for record in published) == list(range(12))
