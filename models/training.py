"""Training a head on a marketplace's own photos: `DIR/<category>/<photo>` (JPEG, PNG, WebP),
through the worker's own decode and preprocessing and the backbone's pooled embedding.

A stratified share of each category is held out (never augmented, never trained on) and the
head is reported on it: accuracy, per-category precision and recall, the confusion matrix.
Augmentation (flips, crops, colour) makes variants of the training photos only.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from models.base import ImageModel
from models.heads import LinearHead, Report, evaluate, fit_linear, stratified_split
from models.preprocess import ImagePreparer

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BATCH = 16
Progress = Callable[[str, int, int], None]


class TrainingError(ValueError):
    """A folder that cannot be trained on, and why."""


@dataclass(frozen=True)
class Photo:
    path: Path
    category: int


def labelled_photos(folder: Path) -> tuple[tuple[str, ...], list[Photo]]:
    """The categories (sub-folder names, sorted) and their photos."""
    if not folder.is_dir():
        raise TrainingError(f"{folder} is not a folder")
    categories = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    photos = [
        Photo(path, number)
        for number, name in enumerate(categories)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in PHOTO_SUFFIXES
    ]
    counts = {name: sum(1 for p in photos if p.category == n) for n, name in enumerate(categories)}
    if len([name for name, count in counts.items() if count]) < 2:
        raise TrainingError(f"{folder} needs at least two category folders with photos: {counts}")
    return categories, photos


def augmented(data: bytes, rng: random.Random) -> bytes:
    """A variant of a photo: maybe mirrored, a crop of 80-100 % of each side, brightness,
    contrast and colour within 25 %, re-encoded as JPEG."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    width, height = image.size
    keep = rng.uniform(0.8, 1.0)
    crop_w, crop_h = max(1, int(width * keep)), max(1, int(height * keep))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.75, 1.25))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def embed(
    backbone: ImageModel,
    preparer: ImagePreparer,
    photos: list[bytes],
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The backbone's pooled embeddings of encoded photos (through the worker's decoding)."""
    vectors = []
    for start in range(0, len(photos), BATCH):
        pixels = [
            preparer.prepare_blocking(data)["pixels"] for data in photos[start : start + BATCH]
        ]
        vectors += [p.embedding for p in backbone.predict_batch(np.stack(pixels))]
        if progress is not None:
            progress(min(start + BATCH, len(photos)))
    return np.stack(vectors).astype(np.float32)


def train_head(
    folder: Path,
    backbone: ImageModel,
    preparer: ImagePreparer,
    *,
    holdout: float = 0.2,
    augment: int = 0,
    seed: int = 0,
    epochs: int = 300,
    progress: Progress | None = None,
) -> tuple[LinearHead, Report]:
    """Train a head on the folder's photos; returns it and its report on the held-out ones."""
    if not 0.0 <= holdout < 1.0:
        raise TrainingError("the held-out share must be at least 0 and below 1")
    started = time.time()
    categories, photos = labelled_photos(folder)
    train, held = stratified_split([p.category for p in photos], holdout, seed)
    rng = random.Random(seed)
    train_bytes, train_labels = [], []
    for index in train:
        data = photos[index].path.read_bytes()
        variants = [data] + [augmented(data, rng) for _ in range(augment)]
        train_bytes += variants
        train_labels += [photos[index].category] * len(variants)
    held_bytes = [photos[index].path.read_bytes() for index in held]

    def step(stage: str, total: int) -> Callable[[int], None]:
        return lambda done: progress(stage, done, total) if progress else None

    x_train = embed(
        backbone, preparer, train_bytes, step("embedding training photos", len(train_bytes))
    )
    x_held = (
        embed(backbone, preparer, held_bytes, step("embedding held-out photos", len(held_bytes)))
        if held_bytes
        else np.zeros((0, x_train.shape[1]), dtype=np.float32)
    )
    rounds = max(1, epochs // 20)
    weight, bias = fit_linear(
        x_train,
        np.array(train_labels),
        len(categories),
        epochs=epochs,
        progress=(lambda number, loss: progress("training", number, rounds)) if progress else None,
    )
    unfinished = LinearHead(
        categories=categories,
        weight=weight,
        bias=bias,
        backbone=backbone.name,
        backbone_version=backbone.version,
        preprocessing=f"{backbone.name}: short side 256 (bicubic), centre crop 224, mean=std=0.5",
    )
    report = evaluate(unfinished, x_held, np.array([photos[i].category for i in held]))
    metadata = {
        "trained_at": round(started, 3),
        "seconds": round(time.time() - started, 1),
        "photos": {
            name: sum(1 for p in photos if p.category == n) for n, name in enumerate(categories)
        },
        "held_out": len(held),
        "holdout": holdout,
        "augment": augment,
        "seed": seed,
        "epochs": epochs,
        "held_out_accuracy": round(report.accuracy, 4),
    }
    head = LinearHead(
        categories=categories,
        weight=weight,
        bias=bias,
        backbone=backbone.name,
        backbone_version=backbone.version,
        preprocessing=unfinished.preprocessing,
        metadata=metadata,
    )
    return head, report
