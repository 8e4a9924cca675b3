"""A task of our own, as a marketplace would add one (`CLASSIFY_TASKS=...,
tests.support.tasks:PriceBand`): it reads the ad's title and price, which the pipeline carries
for tasks, and raises on an image whose ad's title asks it to: the failure must cost that
output only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.base import ImageContext, Prediction
from models.tasks import ModelTask

RAISE = "raise in price-band"


class PriceBand(ModelTask):
    name = "price_band"
    version = "bands-1"

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        if any(RAISE in (context.title or "") for context in contexts):
            raise RuntimeError("the title asked this task to fail")
        return [
            {
                "band": "unknown"
                if context.price is None
                else "high"
                if context.price > 1000
                else "low",
                "title_words": len((context.title or "").split()),
            }
            for context in contexts
        ]
