"""The marketplace's own categories: `train-head` on a labelled folder, through the worker's
decoding, gives a head that sorts photos it never saw; the head file is safe to load and is
refused by a worker of another backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from classify_app.dev.labelled import CATEGORIES, labelled_folder
from classify_app.settings import Settings
from classify_app.worker import create_tasks_from
from models import ImageModel, ImagePreparer
from models.heads import FORMAT, HeadError, LinearHead, stratified_split
from models.tasks import CategoryTask, TaskSet
from models.training import embed

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "classify_app", *args],
        env={**os.environ, "CLASSIFY_MONGO_URI": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[bytes]], str]:
    """A head trained by the command line, the held-out photos, and what the command said."""
    root = tmp_path_factory.mktemp("labelled")
    folder, held = labelled_folder(root / "photos")
    head_path = root / "head.safetensors"
    done = cli("train-head", "--images", str(folder), "--out", str(head_path), "--augment", "2")
    assert done.returncode == 0, done.stderr
    return head_path, held, done.stdout + done.stderr


def test_train_head_reports_on_its_held_out_share(
    trained: tuple[Path, dict[str, list[bytes]], str],
) -> None:
    head_path, _, said = trained
    assert "embedding training photos" in said and "training" in said  # the progress bar
    assert "held-out accuracy" in said and "confusion" in said
    for category in CATEGORIES:
        assert category in said
    head = LinearHead.load(head_path)
    assert head.categories == tuple(sorted(CATEGORIES))
    training = head.metadata
    # 6 crops per source, a fifth of each category held out and never augmented.
    held_out = sum(round(6 * len(train) * 0.2) for train, _ in CATEGORIES.values())
    assert training["held_out"] == held_out
    assert training["augment"] == 2 and training["held_out_accuracy"] >= 0.8


def test_the_head_sorts_photos_it_never_saw(
    trained: tuple[Path, dict[str, list[bytes]], str], loaded_model: ImageModel
) -> None:
    head_path, held, _ = trained
    head = LinearHead.load(head_path)
    preparer = ImagePreparer(TaskSet(loaded_model, []), threads=1, max_pixels=10**8)
    right = total = 0
    for category, photos in held.items():
        guesses = head.predict(embed(loaded_model, preparer, photos)).argmax(axis=1)
        right += sum(head.categories[int(guess)] == category for guess in guesses)
        total += len(photos)
    # Five categories: chance is 20 %. Measured: 95 %.
    assert right / total >= 0.8, f"{right} of {total} held-out photos"


def test_the_head_file_holds_tensors_and_text_only(
    trained: tuple[Path, dict[str, list[bytes]], str],
) -> None:
    head_path, _, _ = trained
    assert not head_path.read_bytes().startswith(b"PK")  # not a torch.save zip of pickles
    with safe_open(str(head_path), framework="numpy") as opened:
        metadata = opened.metadata()
        assert sorted(opened.keys()) == ["bias", "weight"]
        assert opened.get_tensor("weight").shape == (len(CATEGORIES), 1280)
    assert metadata["format"] == FORMAT
    assert metadata["backbone"] == "efficientnet-lite0"
    assert metadata["backbone_version"] and "centre crop 224" in metadata["preprocessing"]
    assert json.loads(metadata["categories"]) == sorted(CATEGORIES)
    assert len(metadata["content_hash"]) == 64


def test_a_damaged_head_file_is_refused(
    trained: tuple[Path, dict[str, list[bytes]], str], tmp_path: Path
) -> None:
    head = LinearHead.load(trained[0])
    damaged = tmp_path / "damaged.safetensors"
    LinearHead(**{**head.__dict__, "weight": head.weight * 1.01}).save(damaged)
    data = bytearray(damaged.read_bytes())
    # Put the original hash back: the weights no longer match it.
    text = data.decode("latin-1").replace(
        LinearHead(**{**head.__dict__, "weight": head.weight * 1.01}).content_hash,
        head.content_hash,
    )
    damaged.write_bytes(text.encode("latin-1"))
    with pytest.raises(HeadError, match="does not match its hash"):
        LinearHead.load(damaged)
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(HeadError, match="not a head file"):
        LinearHead.load(tmp_path / "junk")


def test_a_head_file_with_missing_or_misshapen_parts_is_refused(
    trained: tuple[Path, dict[str, list[bytes]], str], tmp_path: Path
) -> None:
    from safetensors.numpy import save_file

    head = LinearHead.load(trained[0])
    with safe_open(str(trained[0]), framework="numpy") as opened:
        metadata = dict(opened.metadata())
    tensors = {"weight": head.weight, "bias": head.bias}
    cases = {
        "no-categories": ({k: v for k, v in metadata.items() if k != "categories"}, tensors),
        "bad-json": ({**metadata, "training": "{"}, tensors),
        "long-bias": (metadata, {**tensors, "bias": np.zeros(len(head.categories) + 1, "f4")}),
        "flat-weight": (metadata, {**tensors, "weight": head.weight.reshape(-1)}),
    }
    for name, (meta, arrays) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(arrays, str(path), metadata=meta)
        with pytest.raises(HeadError):
            LinearHead.load(path)


def test_a_head_for_another_backbone_is_refused(
    trained: tuple[Path, dict[str, list[bytes]], str], tmp_path: Path, loaded_model: ImageModel
) -> None:
    head = LinearHead.load(trained[0])
    other = tmp_path / "other.safetensors"
    LinearHead(**{**head.__dict__, "backbone": "resnet50", "backbone_version": "v2"}).save(other)
    settings = Settings(head=str(other), mongo_uri="")
    with pytest.raises(HeadError, match=r"trained on resnet50 v2 .*: train a head for it"):
        create_tasks_from(settings, loaded_model)
    smaller = tmp_path / "smaller.safetensors"
    LinearHead(**{**head.__dict__, "weight": head.weight[:, :512]}).save(smaller)
    with pytest.raises(HeadError, match="512-d"):
        create_tasks_from(Settings(head=str(smaller), mongo_uri=""), loaded_model)


def test_classify_image_uses_a_head(
    trained: tuple[Path, dict[str, list[bytes]], str], tmp_path: Path
) -> None:
    head_path, held, _ = trained
    photo = tmp_path / "bike.jpg"
    photo.write_bytes(held["vehicles"][0])
    done = cli("classify-image", "--head", str(head_path), str(photo))
    assert done.returncode == 0, done.stderr
    head = LinearHead.load(head_path)
    assert "category vehicles" in done.stdout and head.version in done.stdout
    refused = cli("classify-image", "--head", str(tmp_path / "missing"), str(photo))
    assert refused.returncode == 1 and "CLASSIFY_HEAD" in refused.stderr


def test_a_head_classifies_through_the_category_task(
    trained: tuple[Path, dict[str, list[bytes]], str], loaded_model: ImageModel
) -> None:
    head = LinearHead.load(trained[0])
    tasks = TaskSet(loaded_model, [CategoryTask(head)])
    preparer = ImagePreparer(tasks, threads=1, max_pixels=10**8)
    inputs = [preparer.prepare_blocking(photo) for photo in trained[1]["kitchen"][:2]]
    stacked = {name: np.stack([i[name] for i in inputs]) for name in tasks.input_shapes}
    for prediction in tasks.predict_batch(stacked):
        assert prediction.category == "kitchen"
        assert set(prediction.category_scores) == set(CATEGORIES)
        assert abs(sum(prediction.category_scores.values()) - 1) < 1e-3
        output = prediction.outputs["category"]
        assert output.version == head.version and output.values["category"] == "kitchen"
    assert tasks.version.endswith(head.version)


@pytest.mark.parametrize("count", [1, 2, 5, 9, 40])
@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_the_split_holds_out_a_share_of_each_category_and_never_all(
    count: int, share: float
) -> None:
    labels = [0] * count + [1] * (count * 2)
    train, held = stratified_split(labels, share, seed=3)
    assert sorted(train + held) == list(range(len(labels)))
    for label in (0, 1):
        of_label = [i for i in held if labels[i] == label]
        assert len(of_label) < labels.count(label)  # something of each is trained on
        if share and labels.count(label) > 1:
            assert of_label
