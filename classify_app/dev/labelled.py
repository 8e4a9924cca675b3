"""A marketplace's own labelled photos (for `train-head` tests and benchmarks), made from
scikit-image's samples: five categories (none of them ImageNet's taxonomy), each with photos
to train on and held-out photos that share no pixel with them. Vehicles and materials hold
out photos of other objects (the right-hand motorcycle, gravel); cats, kitchen and people
hold out the other part of their photo."""

from __future__ import annotations

import io
import random
from importlib import resources
from pathlib import Path

from PIL import Image

# category: (sources to train on, held-out sources); "NAME:left" is the photo's left 60 %,
# "NAME:right" the rest.
CATEGORIES = {
    "vehicles": (["motorcycle_left.png", "rocket.jpg"], ["motorcycle_right.png"]),
    "materials": (["brick.png", "grass.png"], ["gravel.png"]),
    "cats": (["chelsea.png:left"], ["chelsea.png:right"]),
    "kitchen": (["coffee.png:left"], ["coffee.png:right"]),
    "people": (["astronaut.png:left"], ["astronaut.png:right"]),
}


def source(spec: str) -> Image.Image:
    name, _, part = spec.partition(":")
    data = (resources.files("skimage") / "data" / name).read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    split = int(width * 0.6)
    if part == "left":
        return image.crop((0, 0, split, height))
    if part == "right":
        return image.crop((split, 0, width, height))
    return image


def crops(spec: str, count: int, rng: random.Random) -> list[bytes]:
    """`count` JPEGs of random crops (60-90 % of each side) of one source."""
    image = source(spec)
    width, height = image.size
    photos = []
    for _ in range(count):
        keep = rng.uniform(0.6, 0.9)
        crop_w, crop_h = int(width * keep), int(height * keep)
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        buffer = io.BytesIO()
        image.crop((left, top, left + crop_w, top + crop_h)).save(buffer, "JPEG", quality=88)
        photos.append(buffer.getvalue())
    return photos


def labelled_folder(
    root: Path, *, per_source: int = 6, held_per_source: int = 4, seed: int = 0
) -> tuple[Path, dict[str, list[bytes]]]:
    """Writes `root/<category>/<n>.jpg` to train on; returns the folder and the held-out
    photos of each category (never written there)."""
    rng = random.Random(seed)
    held: dict[str, list[bytes]] = {}
    for category, (train, held_out) in CATEGORIES.items():
        folder = root / category
        folder.mkdir(parents=True)
        photos = [photo for spec in train for photo in crops(spec, per_source, rng)]
        for number, photo in enumerate(photos):
            (folder / f"{number}.jpg").write_bytes(photo)
        held[category] = [p for spec in held_out for p in crops(spec, held_per_source, rng)]
    return root, held
