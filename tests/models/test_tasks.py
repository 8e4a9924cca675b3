"""Model tasks on one pass: every task's output for every image, from one decode and one
forward pass of the backbone; a task that raises on one image costs that output only."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from classify_app.dev.images import SAMPLE_PHOTOS, sample_photo_jpeg
from classify_app.settings import Settings, SettingsError
from classify_app.vectors import decode_vector, encode_vector
from classify_app.vocabulary import ImageReason
from classify_app.worker import create_tasks_from
from models import ImageModel, ImagePreparer
from models.base import ImageContext, Prediction
from models.batching import InferenceBatcher
from models.runtime import ModelRuntime
from models.tasks import (
    PREPARE_ERRORS,
    CategoryTask,
    EmbeddingTask,
    ModelTask,
    ModerationTask,
    TaskError,
    TaskSet,
    decode_embedding,
    load_task,
)
from tests.support.tasks import RAISE, PriceBand


@pytest.fixture(scope="module")
def moderation() -> ModerationTask:
    task = ModerationTask({"": 0.8, "flag-all": 0.0})
    task.load()
    return task


def prepared(tasks: TaskSet, names: Sequence[str]) -> dict[str, np.ndarray]:
    preparer = ImagePreparer(tasks, threads=1, max_pixels=10**8)
    inputs = [preparer.prepare_blocking(sample_photo_jpeg(name)) for name in names]
    return {key: np.stack([one[key] for one in inputs]) for key in tasks.input_shapes}


def test_every_task_answers_for_every_image_from_one_pass(
    loaded_model: ImageModel, moderation: ModerationTask
) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), EmbeddingTask(), moderation, PriceBand()])
    names = list(SAMPLE_PHOTOS)
    contexts = [
        ImageContext("general", f"photo of {name}", 10.0 * n) for n, name in enumerate(names)
    ]
    assert set(tasks.input_shapes) == {"pixels", "moderation", PREPARE_ERRORS}  # one decode
    predictions = tasks.predict_batch(prepared(tasks, names), contexts)
    alone = loaded_model.predict_batch(prepared(tasks, names)["pixels"])
    for name, prediction, plain in zip(names, predictions, alone, strict=True):
        assert set(prediction.outputs) == {"category", "embedding", "moderation", "price_band"}
        assert all(output.error is None for output in prediction.outputs.values())
        # The category task is the backbone's ImageNet mapping, as without tasks.
        assert prediction.category == plain.category
        assert prediction.outputs["category"].values == {"category": plain.category}
        assert prediction.outputs["moderation"].values["nsfw_score"] < 0.2, name
        assert prediction.outputs["moderation"].values["flags"] == []
        assert prediction.outputs["price_band"].values["title_words"] == 3
    assert predictions[0].outputs["price_band"].values["band"] == "low"


def test_embeddings_are_unit_length_compact_and_tell_photos_apart(
    loaded_model: ImageModel,
) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), EmbeddingTask()])
    names = ["coffee", "chelsea", "coffee", "rocket"]
    predictions = tasks.predict_batch(prepared(tasks, names))
    records = [p.outputs["embedding"].as_record() for p in predictions]
    assert records[0]["task"] == "embedding" and records[0]["dim"] == 1280
    assert len(records[0]["vector"]) == 3416  # 1,280 float16 in base64: 2.5 KB
    vectors = [decode_embedding(record) for record in records]
    for vector in vectors:
        assert abs(np.linalg.norm(vector) - 1) < 1e-3
    assert float(vectors[0] @ vectors[2]) > 0.999  # the same photo
    assert float(vectors[0] @ vectors[1]) < 0.8 and float(vectors[1] @ vectors[3]) < 0.8


def test_a_lowered_threshold_flags_the_catalog_it_is_set_for(
    loaded_model: ImageModel, moderation: ModerationTask
) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), moderation])
    contexts = [ImageContext("general"), ImageContext("flag-all")]
    general, flagged = tasks.predict_batch(prepared(tasks, ["chelsea", "chelsea"]), contexts)
    assert general.outputs["moderation"].values["flags"] == []
    assert flagged.outputs["moderation"].values["flags"] == ["nsfw"]
    assert (
        general.outputs["moderation"].values["nsfw_score"]
        == flagged.outputs["moderation"].values["nsfw_score"]
    )


class FailsOnTheCat(ModelTask):
    """Raises on any batch holding a photo whose top label is a cat's."""

    name = "fussy"
    version = "1"

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        if any(p.category == "animals" for p in backbone):
            raise ValueError("no cats")
        return [{"ok": True} for _ in backbone]


async def test_a_task_that_raises_on_one_image_fails_only_that_output(
    loaded_model: ImageModel,
) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), FailsOnTheCat(), EmbeddingTask()])
    batcher = InferenceBatcher(ModelRuntime(tasks, streams=1), max_size=8, max_wait_s=0.05)
    preparer = ImagePreparer(tasks, threads=1, max_pixels=10**8)
    names = ["coffee", "chelsea", "rocket"]
    inputs = [await preparer.prepare(sample_photo_jpeg(name)) for name in names]
    coffee, cat, rocket = await asyncio.gather(*(batcher.predict(i) for i in inputs))
    assert {coffee.batch_size, cat.batch_size, rocket.batch_size} == {3}  # one batch
    failed = cat.prediction.outputs["fussy"]
    assert failed.error == (ImageReason.TASK_ERROR, "fussy failed: ValueError: no cats")
    assert failed.as_record()["error"]["reason"] == "task_error"
    # The other images of the batch, and the other tasks on the cat, stand.
    assert coffee.prediction.outputs["fussy"].values == {"ok": True}
    assert rocket.prediction.outputs["fussy"].values == {"ok": True}
    assert cat.prediction.category == "animals"
    assert cat.prediction.outputs["embedding"].error is None


class ThumbnailTask(ModelTask):
    """A task with an input of its own: a 32 x 32 thumbnail, which it cannot make from a
    portrait photo and makes in the wrong shape from a very wide one."""

    name = "thumbnail"
    version = "1"
    input = "thumbnail"
    input_shape = (32, 32, 3)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        if image.height > image.width:
            raise ValueError("no portraits")
        side = 16 if image.width > 2 * image.height else 32
        return np.asarray(image.convert("RGB").resize((side, side)), dtype=np.uint8)

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        assert inputs is not None and inputs.shape[1:] == self.input_shape
        return [{"mean": round(float(pixels.mean()), 3)} for pixels in inputs]


async def test_a_task_that_cannot_prepare_an_image_fails_only_that_output(
    loaded_model: ImageModel,
) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), ThumbnailTask(), EmbeddingTask()])
    batcher = InferenceBatcher(ModelRuntime(tasks, streams=1), max_size=8, max_wait_s=0.05)
    preparer = ImagePreparer(tasks, threads=1, max_pixels=10**8)
    photos = {
        "landscape": Image.new("RGB", (300, 200), (200, 10, 10)),
        "portrait": Image.new("RGB", (200, 300), (10, 200, 10)),
        "panorama": Image.new("RGB", (700, 300), (10, 10, 200)),
    }
    inputs = []
    for photo in photos.values():
        buffer = io.BytesIO()
        photo.save(buffer, "PNG")
        inputs.append(await preparer.prepare(buffer.getvalue()))
    landscape, portrait, panorama = await asyncio.gather(*(batcher.predict(i) for i in inputs))
    assert {landscape.batch_size, portrait.batch_size, panorama.batch_size} == {3}
    assert landscape.prediction.outputs["thumbnail"].error is None
    assert landscape.prediction.outputs["thumbnail"].values["mean"] > 70
    assert portrait.prediction.outputs["thumbnail"].error == (
        ImageReason.TASK_ERROR,
        "thumbnail failed preparing the image: ValueError: no portraits",
    )
    reason, message = panorama.prediction.outputs["thumbnail"].error or ("", "")
    assert reason == ImageReason.TASK_ERROR and "of shape (16, 16, 3), not uint8 of" in message
    # The backbone and the other tasks saw every image.
    for done in (landscape, portrait, panorama):
        assert done.prediction.labels and done.prediction.outputs["embedding"].error is None
        assert done.prediction.outputs["category"].error is None


def test_tasks_naming_one_input_must_agree_on_its_shape(loaded_model: ImageModel) -> None:
    class Larger(ThumbnailTask):
        name = "larger"
        input_shape = (64, 64, 3)

    class Reserved(ThumbnailTask):
        name = "reserved"
        input = PREPARE_ERRORS

    TaskSet(loaded_model, [CategoryTask(), Larger()])  # each alone is fine
    for clash in ([ThumbnailTask(), Larger()], [Reserved()]):
        with pytest.raises(ValueError, match="is another's name"):
            TaskSet(loaded_model, [CategoryTask(), *clash])


class ReturnsJunk(ModelTask):
    """Returns what results cannot carry, for the images of one photo."""

    name = "junk"
    version = "1"

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        junk: list[Any] = [{"score": np.float32(0.5)}, "text", {"flags": "spam"}, {"x": 1.0}]
        return [junk[int(c.title or 0)] for c in contexts]


def test_output_a_result_cannot_carry_fails_that_output_only(loaded_model: ImageModel) -> None:
    tasks = TaskSet(loaded_model, [CategoryTask(), ReturnsJunk()])
    contexts = [ImageContext(title=str(n)) for n in range(4)]
    predictions = tasks.predict_batch(prepared(tasks, ["coffee"] * 4), contexts)
    errors = [p.outputs["junk"].error for p in predictions]
    assert [e is not None for e in errors] == [True, True, True, False]
    assert all(e[0] == ImageReason.TASK_ERROR for e in errors if e is not None)
    assert predictions[3].outputs["junk"].values == {"x": 1.0}
    assert all(p.outputs["category"].error is None for p in predictions)


def test_a_head_that_fails_leaves_the_image_without_a_category(loaded_model: ImageModel) -> None:
    class Broken:
        version = "head-broken"
        categories = ("a", "b")

        def predict(self, embeddings: np.ndarray) -> np.ndarray:
            raise RuntimeError("broken head")

    tasks = TaskSet(loaded_model, [CategoryTask(Broken())])  # type: ignore[arg-type]
    [prediction] = tasks.predict_batch(prepared(tasks, ["coffee"]))
    assert prediction.category == "" and prediction.category_scores == {}  # not ImageNet's
    assert prediction.outputs["category"].error is not None


def test_tasks_of_your_own_load_by_import_path(loaded_model: ImageModel) -> None:
    assert isinstance(load_task("tests.support.tasks:PriceBand"), PriceBand)
    with pytest.raises(TaskError, match="cannot import"):
        load_task("tests.support.nowhere:Task")
    with pytest.raises(TaskError, match=r"not a models\.tasks\.ModelTask"):
        load_task("tests.support.tasks:RAISE")
    settings = Settings(tasks="category,tests.support.tasks:PriceBand", mongo_uri="")
    built = create_tasks_from(settings, loaded_model)
    assert [task.name for task in built.tasks] == ["category", "price_band"]
    with pytest.raises(SettingsError, match="CLASSIFY_TASKS"):
        Settings(tasks="category,embedding,category").validate()
    with pytest.raises(SettingsError, match="CLASSIFY_TASKS"):
        Settings(tasks="category,sentiment").validate()
    with pytest.raises(SettingsError, match="include category"):
        Settings(tasks="embedding").validate()
    assert RAISE  # the integration test's trigger


scores = st.floats(min_value=0, max_value=1, allow_nan=False)
catalogs = st.text(
    st.characters(blacklist_characters=",=", blacklist_categories=["Cs"]), min_size=1, max_size=12
).filter(lambda s: s.strip() == s and s)


@given(default=scores, per_catalog=st.dictionaries(catalogs, scores, max_size=4))
def test_moderation_thresholds_read_back_what_was_written(
    default: float, per_catalog: dict[str, float]
) -> None:
    written = ",".join([repr(default), *(f"{c}={s!r}" for c, s in per_catalog.items())])
    settings = Settings(moderation_thresholds=written, mongo_uri="")
    settings.validate()
    assert settings.thresholds() == {"": default, **per_catalog}
    task = ModerationTask(settings.thresholds())
    for catalog, score in per_catalog.items():
        assert task.threshold(catalog) == score
    assert task.threshold("\x00 no such catalog") == default


@pytest.mark.parametrize(
    "written",
    ["", "1.5", "-0.1", "0.8,adult", "0.8,=0.3", "x", "nan", "adult=0.97", "0.8,a=0.1,a=0.2"],
)
def test_bad_moderation_thresholds_are_refused(written: str) -> None:
    with pytest.raises(SettingsError, match="CLASSIFY_MODERATION_THRESHOLDS"):
        Settings(moderation_thresholds=written).validate()


@given(
    st.lists(
        st.floats(min_value=-60000, max_value=60000, allow_nan=False, width=32),
        min_size=1,
        max_size=64,
    )
)
def test_the_embedding_wire_form_keeps_each_value_to_float16_precision(values: list[float]) -> None:
    vector = np.array(values, dtype=np.float32)
    decoded = decode_vector(encode_vector(vector))
    assert decoded.dtype == np.float32 and decoded.shape == vector.shape
    assert np.allclose(decoded, vector, rtol=2**-11, atol=2**-24)
