"""The download stage in-process, with real parts (downloader, decoder, batcher, model) and
recording sinks: every image gets exactly one outcome, with its reason when it failed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any, cast

import pytest

from agents.acks import LeaveUnacknowledged
from agents.download import DownloadStage
from agents.sinks import DeadLetters
from classify_app.dev.images import SampleImageServer
from classify_app.records import AdAccepted, AdRef, DeadLetter, ImageOutcome, ImageRetry
from classify_app.settings import Settings
from classify_app.worker import WorkerParts
from models import ImageModel
from tests.support.records import RawEvent, RecordingSink


class Sinks:
    """Where the stage under test sends."""

    def __init__(self) -> None:
        self.outcomes = RecordingSink()
        self.retries = RecordingSink()
        self.dead_letters = RecordingSink()


def stage_of(parts: WorkerParts, sinks: Sinks, announce_after: float = 0.0) -> DownloadStage:
    """The download stage, announcing every ad at once unless told otherwise."""
    return DownloadStage(
        parts.images,
        outcomes=sinks.outcomes,
        retries=sinks.retries,
        dead_letters=DeadLetters(sinks.dead_letters, parts.metrics, stage="download"),
        metrics=parts.metrics,
        max_images=parts.settings.max_images_per_ad,
        max_event_bytes=parts.settings.max_event_bytes,
        concurrency=4,
        announce_after=announce_after,
    )


def event(ad: Mapping[str, object]) -> Any:
    return RawEvent(json.dumps(ad).encode(), key=str(ad["ad_id"]).encode())


async def test_an_ad_becomes_one_outcome_per_image(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    base = image_server.url
    ad = {
        "ad_id": "ad-7",
        "catalog_name": "mixed",
        "images": [
            image_server.photo_url("coffee"),
            f"{base}/status/404",
            f"{base}/html-as-jpeg",
            f"{base}/truncated.jpg",
            f"{base}/bomb.png",
            image_server.photo_url("chelsea"),
        ],
    }
    await stage_of(parts, sinks).handle_ad_event(event(ad))

    [accepted, *outcomes] = sinks.outcomes.values
    assert isinstance(accepted, AdAccepted) and accepted.ad.image_count == 6
    assert all(isinstance(outcome, ImageOutcome) for outcome in outcomes)
    by_index = {outcome.index: outcome for outcome in outcomes}
    assert sorted(by_index) == list(range(6))
    reasons = {i: o.error.reason for i, o in by_index.items() if o.error is not None}
    assert reasons == {1: "http_404", 2: "not_an_image", 3: "corrupt_image", 4: "too_many_pixels"}
    assert by_index[0].labels[0].name == "espresso"
    assert by_index[5].category == "animals"
    assert by_index[0].ad.request_id == accepted.ad.request_id
    assert by_index[0].model == "efficientnet-lite0" and by_index[0].model_version
    assert by_index[0].timings["download_seconds"] > 0
    assert by_index[0].timings["inference_seconds"] > 0
    assert by_index[0].timings["batch_size"] >= 1
    assert by_index[1].model is None  # failed before the model saw it
    assert sinks.retries.values == [] and sinks.dead_letters.values == []
    assert parts.batcher.waiting() == 0


async def test_a_transient_failure_is_handed_to_the_retry_stage(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    stage = stage_of(parts, sinks)
    ad = {"ad_id": "ad-9", "catalog_name": "c", "images": [f"{image_server.url}/status/503"]}
    await stage.handle_ad_event(event(ad))
    [retry] = sinks.retries.values
    assert isinstance(retry, ImageRetry) and retry.attempt == 2 and retry.reason == "http_503"

    # The last attempt fails for good, saying how many were made.
    await stage.process_image(retry.ad, retry.index, retry.url, attempt=parts.images.attempts)
    outcome = sinks.outcomes.values[-1]
    assert outcome.error.reason == "http_503" and "after 3 attempts" in outcome.error.message


async def test_malformed_events_go_to_the_dead_letter_topic(parts: WorkerParts) -> None:
    sinks = Sinks()
    stage = stage_of(parts, sinks)
    await stage.handle_ad_event(cast(Any, RawEvent(b'{"ad_id": "x", "images": ')))
    await stage.handle_ad_event(event({"ad_id": "y", "images": [3]}))

    letters: list[DeadLetter] = sinks.dead_letters.values
    assert [letter.reason for letter in letters] == ["malformed_json", "invalid_event"]
    assert letters[0].payload == '{"ad_id": "x", "images": '
    assert sinks.outcomes.values == []


async def test_an_outcome_that_cannot_be_sent_leaves_its_ad_unacknowledged(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    sinks.outcomes.fail_when = lambda value: isinstance(value, ImageOutcome) and value.index == 0
    photo = image_server.photo_url("coffee")
    ad = {"ad_id": "ad-3", "catalog_name": "c", "images": [photo, photo]}
    stage = stage_of(parts, sinks)
    with pytest.raises(LeaveUnacknowledged, match="ImageOutcome not delivered"):
        await stage.handle_ad_event(event(ad))
    # Not recorded as failed, not dead-lettered: the other image's outcome went out, and the
    # ad is processed again.
    sent = sinks.outcomes.values
    assert [type(record) for record in sent] == [AdAccepted, ImageOutcome]
    assert sent[1].index == 1 and sent[1].error is None
    assert sinks.dead_letters.values == []


async def test_an_ad_is_left_unacknowledged_when_the_model_cannot_load(
    settings: Settings, image_server: SampleImageServer
) -> None:
    # A device this machine does not have: the real model fails to load.
    parts = WorkerParts(dataclasses.replace(settings, device="cuda:7"))
    sinks = Sinks()
    ad = {"ad_id": "ad-8", "catalog_name": "c", "images": [image_server.photo_url("coffee")]}
    try:
        with pytest.raises(LeaveUnacknowledged):
            await stage_of(parts, sinks).handle_ad_event(event(ad))
    finally:
        await parts.on_stop()
    assert parts.runtime.error is not None
    # The ad was announced, but neither failed nor dead-lettered: it is processed again.
    assert [type(m) for m in sinks.outcomes.values] == [AdAccepted]
    assert sinks.dead_letters.values == []


async def test_a_slow_image_server_cannot_hold_every_download_slot(
    settings: Settings, loaded_model: ImageModel, image_server: SampleImageServer
) -> None:
    limited = dataclasses.replace(
        settings, download_connections=4, download_connections_per_host=2, download_timeout_s=5
    )
    parts = WorkerParts(limited, model=loaded_model)
    ad = AdRef(
        ad_id="slow", request_id="r", catalog_name="c", catalog_ad_id="slow",
        image_count=7, version=1.0, submitted_at=1.0, accepted_at=1.0,
    )  # fmt: skip
    try:
        await parts.runtime.start()
        slow = [
            asyncio.ensure_future(parts.images.process(ad, index, f"{image_server.url}/slow/2"))
            for index in range(6)
        ]
        await asyncio.sleep(0.2)  # the slow host has all it may have: 2 slots
        started = time.monotonic()
        # The same server under another name is another host: it gets a slot at once.
        fast = await parts.images.process(
            ad, 6, image_server.photo_url("coffee").replace("127.0.0.1", "localhost")
        )
        assert isinstance(fast, ImageOutcome) and fast.error is None
        assert time.monotonic() - started < 1.5
        assert all(isinstance(o, ImageOutcome) for o in await asyncio.gather(*slow))
    finally:
        await parts.on_stop()


async def test_an_announcement_or_a_dead_letter_not_delivered_leaves_the_event_unacknowledged(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    sinks.outcomes.fail_when = lambda value: isinstance(value, AdAccepted)
    ad = {"ad_id": "ad-4", "catalog_name": "c", "images": [image_server.photo_url("coffee")]}
    with pytest.raises(LeaveUnacknowledged, match="AdAccepted not delivered"):
        await stage_of(parts, sinks).handle_ad_event(event(ad))
    assert sinks.dead_letters.values == []  # not dead-lettered as an internal error
    sinks.dead_letters.fail_when = lambda value: True
    with pytest.raises(LeaveUnacknowledged, match="DeadLetter not delivered"):
        await stage_of(parts, sinks).handle_ad_event(cast(Any, RawEvent(b"{nope")))


async def test_a_quick_ad_is_not_announced_its_first_outcome_creates_its_result(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    photo = image_server.photo_url("coffee")
    ad = {"ad_id": "ad-q", "catalog_name": "c", "images": [photo, photo]}
    await stage_of(parts, sinks, announce_after=60).handle_ad_event(event(ad))
    assert [type(m) for m in sinks.outcomes.values] == [ImageOutcome, ImageOutcome]
    assert sinks.outcomes.values[0].ad.image_count == 2  # all the result needs


async def test_a_slow_ad_is_announced_as_pending_before_its_outcomes(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    ad = {"ad_id": "ad-s", "catalog_name": "c", "images": [f"{image_server.url}/slow/1"]}
    await stage_of(parts, sinks, announce_after=0.2).handle_ad_event(event(ad))
    assert [type(m) for m in sinks.outcomes.values] == [AdAccepted, ImageOutcome]


async def test_an_ad_whose_images_all_wait_for_a_retry_is_announced_at_once(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    ad = {"ad_id": "ad-r", "catalog_name": "c", "images": [f"{image_server.url}/status/503"]}
    started = time.monotonic()
    await stage_of(parts, sinks, announce_after=60).handle_ad_event(event(ad))
    assert time.monotonic() - started < 30  # not after the announcement's delay
    assert [type(m) for m in sinks.outcomes.values] == [AdAccepted]
    assert [type(m) for m in sinks.retries.values] == [ImageRetry]


async def test_a_late_announcement_not_delivered_leaves_the_ad_unacknowledged(
    parts: WorkerParts, image_server: SampleImageServer
) -> None:
    sinks = Sinks()
    sinks.outcomes.fail_when = lambda value: isinstance(value, AdAccepted)
    ad = {"ad_id": "ad-f", "catalog_name": "c", "images": [f"{image_server.url}/slow/1"]}
    with pytest.raises(LeaveUnacknowledged, match="AdAccepted not delivered"):
        await stage_of(parts, sinks, announce_after=0.2).handle_ad_event(event(ad))
    assert sinks.dead_letters.values == []
