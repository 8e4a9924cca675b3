"""The adaptive batcher with the real model: batches fill up to their size, every caller gets
its own prediction, and each kind of failure reaches exactly the callers it concerns."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from PIL import Image

from classify_app.dev.images import sample_pixels
from models import ImageModel, ImageRejected, Prediction, create_model
from models.batching import (
    BatcherStopping,
    DeviceFailed,
    InferenceBatcher,
    InferenceFailed,
    ModelUnavailable,
)
from models.runtime import ModelRuntime
from models.tasks import CategoryTask, TaskSet


def runtime_of(model: ImageModel) -> ModelRuntime:
    return ModelRuntime(TaskSet(model, [CategoryTask()]), streams=1)


def batcher_of(model: ImageModel, *, max_size: int, max_wait_s: float) -> InferenceBatcher:
    return InferenceBatcher(runtime_of(model), max_size=max_size, max_wait_s=max_wait_s)


def pixels(array: np.ndarray) -> dict[str, np.ndarray]:
    return {"pixels": array}


async def test_images_are_predicted_in_batches(loaded_model: ImageModel) -> None:
    observed: list[int] = []
    batcher = InferenceBatcher(
        runtime_of(loaded_model),
        max_size=3,
        max_wait_s=0.05,
        on_batch=lambda size, seconds, waits: observed.append(size),
    )
    photos = ["coffee", "chelsea", "camera", "coffee"]
    predicted = await asyncio.wait_for(
        asyncio.gather(*(batcher.predict(pixels(sample_pixels(loaded_model, p))) for p in photos)),
        60,
    )
    assert predicted[0].prediction.labels[0].name == "espresso"
    assert predicted[1].prediction.category == "animals"
    assert predicted[2].prediction.labels[0].name == "tripod"
    # Four images, batches of at most three: the first three together, the last one alone.
    assert [p.batch_size for p in predicted] == [3, 3, 3, 1]
    assert observed == [3, 1]
    assert all(p.inference_seconds > 0 for p in predicted)
    assert batcher.waiting() == 0


async def test_a_shape_the_model_does_not_take_is_refused_at_once(
    loaded_model: ImageModel,
) -> None:
    batcher = batcher_of(loaded_model, max_size=8, max_wait_s=0.01)
    with pytest.raises(ImageRejected) as caught:
        await batcher.predict(pixels(np.zeros((100, 100, 3), dtype=np.uint8)))
    assert caught.value.reason == "model_input_mismatch"
    assert batcher.waiting() == 0


async def test_a_model_that_cannot_load_fails_every_waiting_caller() -> None:
    batcher = batcher_of(
        create_model("efficientnet-lite0", device="cuda:7"), max_size=8, max_wait_s=0
    )
    zeros = np.zeros((224, 224, 3), dtype=np.uint8)
    results = await asyncio.gather(
        batcher.predict(pixels(zeros)), batcher.predict(pixels(zeros)), return_exceptions=True
    )
    assert all(isinstance(result, ModelUnavailable) for result in results)


class BrokenOnDemand(ImageModel):
    """The loaded model, except that a batch holding a black image raises, or, once `hang` is
    set, never returns."""

    def __init__(self, model: ImageModel) -> None:
        self.model = model
        self.name, self.version, self.input_size = model.name, model.version, model.input_size
        self.hang = threading.Event()
        self.release = threading.Event()

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.model.preprocess(image)

    def load(self) -> None:
        self.model.load()

    @property
    def device(self) -> str:
        return self.model.device

    def predict_batch(self, images: np.ndarray) -> list[Prediction]:
        if self.hang.is_set():
            self.release.wait(30)
        if (images.reshape(len(images), -1).max(axis=1) == 0).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.model.predict_batch(images)


BLACK = np.zeros((224, 224, 3), dtype=np.uint8)


async def test_a_failed_batch_is_tried_again_and_an_image_that_fails_alone_fails(
    loaded_model: ImageModel,
) -> None:
    batcher = batcher_of(BrokenOnDemand(loaded_model), max_size=1, max_wait_s=0)
    coffee = sample_pixels(loaded_model, "coffee")
    # First: most likely the device (out of memory, a lost context): left for another try.
    with pytest.raises(DeviceFailed, match="illegal memory access"):
        await batcher.predict(pixels(BLACK))
    assert (await batcher.predict(pixels(coffee))).prediction.labels[0].name == "espresso"
    # Failing again while other batches ran: the image's own fault, for good.
    with pytest.raises(InferenceFailed, match="failed in 2 batches"):
        await batcher.predict(pixels(BLACK))
    assert batcher.runtime.broken is None


async def test_batches_failing_in_a_row_mark_the_model_broken(loaded_model: ImageModel) -> None:
    batcher = batcher_of(BrokenOnDemand(loaded_model), max_size=1, max_wait_s=0)
    for _ in range(3):
        with pytest.raises(DeviceFailed):
            await batcher.predict(pixels(BLACK))
    assert batcher.runtime.broken and not batcher.runtime.ready
    assert batcher.runtime.broken_event.is_set()
    with pytest.raises(ModelUnavailable):  # nothing more goes to a broken model
        await batcher.predict(pixels(sample_pixels(loaded_model, "coffee")))


async def test_a_batch_that_hangs_marks_the_model_broken(loaded_model: ImageModel) -> None:
    model = BrokenOnDemand(loaded_model)
    batcher = InferenceBatcher(runtime_of(model), max_size=1, max_wait_s=0, timeout_s=0.5)
    await batcher.runtime.start()
    model.hang.set()
    try:
        with pytest.raises(DeviceFailed, match=r"longer than 0\.5 s"):
            await batcher.predict(pixels(sample_pixels(loaded_model, "coffee")))
        assert batcher.runtime.broken is not None and not batcher.runtime.ready
    finally:
        model.release.set()


async def test_images_not_yet_in_a_batch_are_given_up_at_shutdown(
    loaded_model: ImageModel,
) -> None:
    batcher = batcher_of(loaded_model, max_size=8, max_wait_s=5.0)
    waiting = asyncio.ensure_future(batcher.predict(pixels(sample_pixels(loaded_model, "coffee"))))
    await asyncio.sleep(0.05)  # queued, the batch still filling
    batcher.abandon_waiting()
    with pytest.raises(BatcherStopping):
        await waiting
