"""The inference stage in memory: real model, batched, one outcome per image, errors contained."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from agents.classify import InferenceBatcher, OutcomeNotSent, PreparedImage
from classify_app.application import runtime
from classify_app.local import sample_pixels
from classify_app.records import AdRef, ImageOutcome
from classify_app.topics import image_outcomes_topic

AD = AdRef(
    ad_id="ad-1",
    request_id="r",
    catalog_name="c",
    catalog_ad_id="1",
    image_count=4,
    version=1.0,
    submitted_at=1.0,
    accepted_at=1.0,
)


def prepared(index: int, pixels: np.ndarray) -> PreparedImage:
    return PreparedImage(
        ad=AD,
        index=index,
        url=f"http://img/{index}.jpg",
        pixels=pixels,
        download_seconds=0.01,
        preprocess_seconds=0.005,
    )


async def test_images_are_classified_in_batches(faust_app: Any, sent: Any) -> None:
    batcher = InferenceBatcher(max_size=3, max_wait_s=0.05)
    images = [
        prepared(i, sample_pixels(runtime.model, p))
        for i, p in enumerate(["coffee", "chelsea", "camera"])
    ]
    wrong_size = prepared(3, np.zeros((100, 100, 3), dtype=np.uint8))
    await asyncio.wait_for(
        asyncio.gather(*(batcher.classify(image) for image in [*images, wrong_size])), 60
    )

    outcomes: list[ImageOutcome] = sent.values(image_outcomes_topic)
    by_index = {outcome.index: outcome for outcome in outcomes}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0].labels[0].name == "espresso"
    assert by_index[1].category == "animals"
    assert by_index[2].labels[0].name == "tripod"
    assert by_index[3].error is not None and by_index[3].error.reason == "model_input_mismatch"
    assert by_index[0].model == "efficientnet-lite0" and by_index[0].model_version
    assert by_index[0].timings["download_seconds"] == 0.01
    assert by_index[0].timings["inference_seconds"] > 0
    # Four images, batches of at most three: the first three together, the last one alone.
    assert [by_index[i].timings["batch_size"] for i in range(3)] == [3, 3, 3]
    assert batcher.waiting() == 0


async def test_a_failed_send_leaves_only_its_image_unsent(
    faust_app: Any, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = InferenceBatcher(max_size=1, max_wait_s=0.0)
    pixels = sample_pixels(runtime.model, "coffee")
    real_send = image_outcomes_topic.send
    calls = 0

    async def send_failing_once(**kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker gone")
        await real_send(**kwargs)

    monkeypatch.setattr(image_outcomes_topic, "send", send_failing_once)
    first, second = await asyncio.gather(
        batcher.classify(prepared(0, pixels)),
        batcher.classify(prepared(1, pixels)),
        return_exceptions=True,
    )
    # Not a failure outcome: the image is left for its ad to be processed again.
    assert isinstance(first, OutcomeNotSent) and second is None
    assert [outcome.index for outcome in sent.values(image_outcomes_topic)] == [1]
