"""Labels on the sample photos, through the worker's own decoding and model: a change meant to
be faster must not change what the model says.

    python bench/labels.py [--out FILE] [--reference FILE]

Classifies each sample photo twice, as the image server of the benchmarks serves it (JPEG,
quality 90) and as scikit-image ships it (PNG or JPEG), with the default settings' model and
decoding. Prints the top label and score of each and writes them as JSON. With
`--reference`, compares against an earlier run's JSON: the top label must be the same on
every photo and every score of the top five within 1 point (0.01); exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from classify_app.dev.images import SAMPLE_PHOTOS, sample_photo_jpeg
from classify_app.settings import Settings
from classify_app.worker import create_tasks_from
from models import ImagePreparer
from models.base import ImageContext

TOLERANCE = 0.01


def photos() -> dict[str, bytes]:
    found = {}
    for name, file_name in SAMPLE_PHOTOS.items():
        found[f"{name}.jpg (served)"] = sample_photo_jpeg(name)
        shipped = resources.files("skimage") / "data" / file_name
        found[f"{name} ({file_name})"] = shipped.read_bytes()
    return found


def classify() -> dict[str, list[dict[str, Any]]]:
    settings = Settings.from_env()
    model = create_tasks_from(settings)
    model.load()
    preparer = ImagePreparer(model, threads=1, max_pixels=settings.max_image_pixels)
    labels = {}
    for name, data in photos().items():
        inputs = preparer.prepare_blocking(data)
        stacked = {key: np.stack([value]) for key, value in inputs.items()}
        [prediction] = model.predict_batch(stacked, [ImageContext()])
        labels[name] = [
            {"name": label.name, "score": round(float(label.score), 5)}
            for label in prediction.labels[:5]
        ]
    return labels


def differences(labels: dict[str, list[dict]], reference: dict[str, list[dict]]) -> list[str]:
    found = []
    for photo, expected in reference.items():
        got = labels.get(photo)
        if got is None:
            found.append(f"{photo}: not classified")
            continue
        if got[0]["name"] != expected[0]["name"]:
            found.append(f"{photo}: top label {got[0]['name']} instead of {expected[0]['name']}")
        scores = {label["name"]: label["score"] for label in got}
        for label in expected:
            score = scores.get(label["name"])
            if score is None or abs(score - label["score"]) > TOLERANCE:
                found.append(f"{photo}: {label['name']} {score} instead of {label['score']}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/labels.json")
    parser.add_argument("--reference", default="")
    args = parser.parse_args()
    labels = classify()
    for photo, top in labels.items():
        print(f"{photo:32} {top[0]['name']:24} {top[0]['score']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(labels, indent=2))
    print(f"written to {out}")
    if args.reference:
        found = differences(labels, json.loads(Path(args.reference).read_text()))
        if found:
            print("labels changed:\n  " + "\n  ".join(found))
            sys.exit(1)
        print(f"labels as in {args.reference}: every top label, every score within {TOLERANCE}")


if __name__ == "__main__":
    main()
