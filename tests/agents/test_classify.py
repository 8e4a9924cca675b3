"""The inference stage with Faust's test_context(): real model, batched, one outcome per task."""

from __future__ import annotations

import base64
from typing import Any

from agents.classify import classify_images
from classify_app.application import runtime
from classify_app.local import sample_pixels
from classify_app.records import AdRef, ImageOutcome, ImageTask
from classify_app.topics import image_outcomes_topic


def task(ad: AdRef, index: int, photo: str) -> ImageTask:
    pixels = sample_pixels(runtime.model, photo)
    return ImageTask(
        ad=ad,
        index=index,
        url=f"http://img/{photo}.jpg",
        pixels=base64.b64encode(pixels.tobytes()).decode("ascii"),
        height=pixels.shape[0],
        width=pixels.shape[1],
        download_seconds=0.01,
        preprocess_seconds=0.005,
    )


async def test_tasks_are_classified_in_batches(faust_app: Any, sent: Any) -> None:
    ad = AdRef(
        ad_id="ad-1",
        request_id="r",
        catalog_name="c",
        catalog_ad_id="1",
        image_count=4,
        version=1.0,
        submitted_at=1.0,
        accepted_at=1.0,
    )
    wrong_size = task(ad, 3, "camera").derive(height=100, width=100)
    async with classify_images.test_context() as agent:
        for index, photo in enumerate(["coffee", "chelsea", "camera"]):
            await agent.put(key=b"ad-1", value=task(ad, index, photo))
        await agent.put(key=b"ad-1", value=wrong_size)
        await sent.wait_for(4, timeout=60)

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
    assert 1 <= by_index[0].timings["batch_size"] <= 3
