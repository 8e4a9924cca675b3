"""Training a head on small folders: held-out accuracy with and without augmentation.

    python bench/heads.py [--per-source 1,2,6] [--augment 0,2,4] [--seeds 3] [--out FILE]

Builds the labelled sample folder (`classify_app.dev.labelled`: five categories; held-out
photos share no pixel with the training ones), trains a head per photos-per-source, augment
count and seed, through the worker's own decoding and `models.training`, and scores it on the
held-out photos. Prints mean accuracy per cell and the training seconds; writes JSON.
Chance is 20 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from classify_app.dev.labelled import labelled_folder
from models import ImagePreparer, create_model
from models.tasks import TaskSet
from models.training import embed, train_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", default="1,2,6")
    parser.add_argument("--augment", default="0,2,4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench-results/heads.json")
    args = parser.parse_args()

    backbone = create_model("efficientnet-lite0", device="cpu")
    backbone.load()
    preparer = ImagePreparer(TaskSet(backbone, []), threads=1, max_pixels=10**8)
    rows = []
    for per_source in [int(n) for n in args.per_source.split(",")]:
        for augment in [int(n) for n in args.augment.split(",")]:
            accuracies, seconds = [], []
            for seed in range(args.seeds):
                root = Path(tempfile.mkdtemp(prefix="classify-heads-"))
                folder, held = labelled_folder(
                    root / "photos", per_source=per_source, held_per_source=4, seed=seed
                )
                started = time.perf_counter()
                head, _ = train_head(
                    folder, backbone, preparer, holdout=0.0, augment=augment, seed=seed
                )
                seconds.append(time.perf_counter() - started)
                right = total = 0
                for category, photos in held.items():
                    guesses = head.predict(embed(backbone, preparer, photos)).argmax(axis=1)
                    right += int(np.sum([head.categories[g] == category for g in guesses]))
                    total += len(photos)
                accuracies.append(right / total)
            row = {
                "photos_per_source": per_source,
                "augment": augment,
                "mean_held_out_accuracy": round(statistics.mean(accuracies), 3),
                "min_held_out_accuracy": round(min(accuracies), 3),
                "mean_training_seconds": round(statistics.mean(seconds), 1),
            }
            rows.append(row)
            print(
                f"{per_source} photos per source, augment {augment}: held-out accuracy "
                f"{row['mean_held_out_accuracy']:.1%} (min {row['min_held_out_accuracy']:.1%}) "
                f"in {row['mean_training_seconds']} s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chance": 0.2, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
