"""A duplicate test set made from scikit-image's sample photos: distinct photos, and copies of
them as a reposted ad would carry them (re-encoded at JPEG quality 50-95, resized to 50-150 %,
cropped by up to 10 %, a small text watermark, mirrored, or all of these at once).

`motorcycle_right.png` is left out: it is `motorcycle_left.png` taken 2 cm to the side (a
stereo pair), which a marketplace would call the same photo.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from classify_app.records import AdVectors, ImageVector
from classify_app.vectors import encode_vector
from tables.similarity import SimilarityIndex

DISTINCT = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
    "logo.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
    "text.png",
)  # fmt: skip
TRANSFORMS = ("quality", "resize", "crop", "watermark", "mirror", "all")


@dataclass(frozen=True)
class Copy:
    """A transformed copy of one distinct photo."""

    source: str
    transform: str
    data: bytes


def photo(name: str) -> Image.Image:
    data = (resources.files("skimage") / "data" / name).read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def transformed(image: Image.Image, transform: str, rng: random.Random) -> bytes:
    """One copy of `image` as `transform` makes it (always re-encoded at quality 50-95)."""
    if transform in ("resize", "all"):
        scale = rng.uniform(0.5, 1.5)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    if transform in ("crop", "all"):
        share = rng.uniform(0.02, 0.1)
        dx, dy = int(image.width * share), int(image.height * share)
        left, top = rng.randint(0, dx), rng.randint(0, dy)
        image = image.crop((left, top, image.width - (dx - left), image.height - (dy - top)))
    if transform in ("watermark", "all"):
        image = image.copy()
        ImageDraw.Draw(image).text(
            (image.width * 0.05, image.height * 0.85), "SOLD by shop123 - call now", fill="white"
        )
    if transform in ("mirror", "all"):
        image = ImageOps.mirror(image)
    return jpeg(image, rng.randint(50, 95))


def duplicate_set(copies_per_photo: int = 4, seed: int = 0) -> tuple[dict[str, bytes], list[Copy]]:
    """The distinct photos (as JPEGs) and transformed copies of each, every transform in
    turn."""
    rng = random.Random(seed)
    originals = {name: jpeg(photo(name)) for name in DISTINCT}
    copies = [
        Copy(name, TRANSFORMS[(number + offset) % len(TRANSFORMS)], b"")
        for offset, name in enumerate(DISTINCT)
        for number in range(copies_per_photo)
    ]
    return originals, [
        Copy(c.source, c.transform, transformed(photo(c.source), c.transform, rng)) for c in copies
    ]


def score_duplicates(
    embed: Callable[[list[bytes]], np.ndarray],
    threshold: float,
    *,
    copies_per_photo: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Precision and recall of the similarity index's `duplicates` on the duplicate set.

    Every distinct photo is posted first, as its own ad; then every copy is posted as a new
    ad, and its duplicates are compared with its source. A copy that finds its source is a
    true positive, every other ad it reports a false positive, a copy that does not find its
    source a false negative. The distinct photos, posted again as new ads against each other
    only, must find nothing (any report is a false positive).
    """
    originals, copies = duplicate_set(copies_per_photo, seed)
    names = list(originals)
    original_vectors = embed([originals[name] for name in names])
    copy_vectors = embed([copy.data for copy in copies])
    index = SimilarityIndex(original_vectors.shape[1])
    false_positives = 0
    for number, (name, vector) in enumerate(zip(names, original_vectors, strict=True)):
        posted = _ad(name, float(number), vector)
        false_positives += len(index.duplicates(posted, threshold))
        index.put(posted)
    true_positives = false_negatives = 0
    by_transform: dict[str, list[int]] = {}
    for number, (copy, vector) in enumerate(zip(copies, copy_vectors, strict=True)):
        found = {d.ad_id for d in index.duplicates(_ad(f"copy-{number}", 1e6, vector), threshold)}
        hit = copy.source in found
        true_positives += hit
        false_negatives += not hit
        false_positives += len(found - {copy.source})
        by_transform.setdefault(copy.transform, []).append(int(hit))
    return {
        "threshold": threshold,
        "distinct_photos": len(names),
        "copies": len(copies),
        "precision": round(true_positives / max(true_positives + false_positives, 1), 4),
        "recall": round(true_positives / max(len(copies), 1), 4),
        "true_positives": true_positives,
        "false_positives": false_positives,
        "false_negatives": false_negatives,
        "recall_by_transform": {
            name: round(sum(hits) / len(hits), 3) for name, hits in sorted(by_transform.items())
        },
    }


def _ad(ad_id: str, version: float, vector: np.ndarray) -> AdVectors:
    encoded = encode_vector(vector)
    return AdVectors(
        ad_id=ad_id,
        request_id=ad_id,
        catalog_name="c",
        version=version,
        submitted_at=version,
        images=[ImageVector(index=0, vector=encoded)],
    )
