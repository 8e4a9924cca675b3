"""The interface every model task implements, and the values it returns.

A model is created cheaply (no weights, no torch import), so that the download stage can use
its preprocessing; `load()` brings the weights in and is called once per worker, off the event
loop. After `load()` returns, `predict_batch` may be called from several threads at once (the
runtime runs one batch per inference thread).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from classify_app.vocabulary import Label


@dataclass(frozen=True)
class Prediction:
    """What a model says about one image: its labels and categories, the backbone's pooled
    embedding (float32, when the model has one), and the outputs of the worker's tasks
    (`models.tasks`), each under its task's name."""

    labels: list[Label]
    category: str
    category_scores: dict[str, float] = field(default_factory=dict)
    embedding: Any = None
    outputs: dict[str, TaskOutput] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskOutput:
    """One task's output for one image: its values, or why there are none."""

    task: str
    version: str
    values: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason code, message)

    def as_record(self) -> dict[str, Any]:
        """The output as results carry it: `{"task", "version", ...values}` or with `error`."""
        record: dict[str, Any] = {"task": self.task, "version": self.version, **self.values}
        if self.error is not None:
            record["error"] = {"reason": self.error[0], "message": self.error[1]}
        return record


@dataclass(frozen=True)
class ImageContext:
    """What a task may know of an image's ad besides its pixels (a price model reads these)."""

    catalog_name: str = ""
    title: str | None = None
    price: float | None = None


class ImageModel(abc.ABC):
    """A model task: preprocessing plus batched inference.

    `preprocess` runs in a decode thread (no torch needed) and returns the uint8 array that
    the batcher stacks for `predict_batch`.
    """

    name: str
    version: str
    input_size: int

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Turn a decoded RGB image into the model's uint8 input (H x W x 3)."""

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size a JPEG may be decoded at without hurting `preprocess`."""
        return width, height

    @abc.abstractmethod
    def load(self) -> None:
        """Load the weights, move them to the device and warm up; blocking."""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """The device the model runs on once loaded (`cpu`, `cuda:0`)."""

    @abc.abstractmethod
    def predict_batch(self, images: np.ndarray) -> list[Prediction]:
        """Predict a batch of preprocessed images (N x H x W x 3, uint8); blocking."""
