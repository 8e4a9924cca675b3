"""A marketplace's own categories: a linear (multinomial logistic) head on the backbone's
pooled embedding, trained from its labelled photos (`train-head`), kept in one safetensors
file: the weights and bias, and as metadata the category names, the backbone (name, version,
embedding size) it was trained on, the preprocessing, the training report and a content hash.
Never a pickle: loading it runs no code.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "classify-app-head/1"


class HeadError(ValueError):
    """A head file that cannot be used (unreadable, or trained for another backbone)."""


@dataclass(frozen=True)
class LinearHead:
    """Category scores = softmax(embedding @ weight.T + bias)."""

    categories: tuple[str, ...]
    weight: np.ndarray  # categories x embedding size, float32
    bias: np.ndarray  # categories, float32
    backbone: str
    backbone_version: str
    preprocessing: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """SHA-256 of the weights and category names: names this head in results."""
        digest = hashlib.sha256()
        digest.update(json.dumps(list(self.categories)).encode())
        digest.update(np.ascontiguousarray(self.weight, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(self.bias, dtype="<f4").tobytes())
        return digest.hexdigest()

    @property
    def version(self) -> str:
        """How results name it: `head-<first 12 hex of the hash>`."""
        return f"head-{self.content_hash[:12]}"

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Category probabilities (N x categories) for pooled embeddings (N x size)."""
        logits = embeddings.astype(np.float32) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def check_backbone(self, name: str, version: str, embedding_size: int) -> None:
        """Refuse a head trained for another backbone, saying which."""
        if (self.backbone, self.backbone_version) != (name, version) or (
            self.weight.shape[1] != embedding_size
        ):
            raise HeadError(
                f"the head was trained on {self.backbone} {self.backbone_version} "
                f"({self.weight.shape[1]}-d embeddings); this worker runs {name} {version} "
                f"({embedding_size}-d): train a head for it"
            )

    def save(self, path: Path) -> None:
        """Write the head as one safetensors file."""
        from safetensors.numpy import save_file

        metadata = {
            "format": FORMAT,
            "categories": json.dumps(list(self.categories)),
            "backbone": self.backbone,
            "backbone_version": self.backbone_version,
            "preprocessing": self.preprocessing,
            "training": json.dumps(self.metadata),
            "content_hash": self.content_hash,
        }
        save_file(
            {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)},
            str(path),
            metadata=metadata,
        )

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        """Read a head file; `HeadError` says what is wrong with one that is not."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as opened:
                metadata = opened.metadata() or {}
                tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
        except Exception as exc:
            raise HeadError(f"{path}: not a head file ({type(exc).__name__}: {exc})") from None
        if metadata.get("format") != FORMAT or set(tensors) != {"weight", "bias"}:
            raise HeadError(f"{path}: not a {FORMAT} file")
        try:
            head = cls(
                categories=tuple(str(name) for name in json.loads(metadata["categories"])),
                weight=tensors["weight"].astype(np.float32),
                bias=tensors["bias"].astype(np.float32),
                backbone=metadata["backbone"],
                backbone_version=metadata["backbone_version"],
                preprocessing=metadata["preprocessing"],
                metadata=dict(json.loads(metadata.get("training", "{}"))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"{path}: its metadata is incomplete ({exc!r})") from None
        size = len(head.categories)
        if head.weight.ndim != 2 or head.weight.shape[0] != size or head.bias.shape != (size,):
            raise HeadError(
                f"{path}: weights {head.weight.shape} and bias {head.bias.shape} do not fit "
                f"{size} categories"
            )
        if head.content_hash != metadata.get("content_hash"):
            raise HeadError(f"{path}: its content does not match its hash (a damaged file?)")
        return head


def stratified_split(
    labels: Sequence[int], holdout: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices to train on and to hold out, holding out `holdout` of each category (at least
    one photo of each category with two or more)."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    train: list[int] = []
    held: list[int] = []
    for indices in by_label.values():
        rng.shuffle(indices)
        count = min(len(indices) - 1, max(1, round(len(indices) * holdout))) if holdout else 0
        held += indices[:count]
        train += indices[count:]
    return sorted(train), sorted(held)


def fit_linear(
    embeddings: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    epochs: int = 300,
    weight_decay: float = 1e-4,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, balanced (each category weighs as much in the loss
    whatever its number of photos), by full-batch L-BFGS in torch; returns (weight, bias)."""
    import torch

    x = torch.from_numpy(embeddings.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    counts = torch.bincount(y, minlength=classes).clamp(min=1).float()
    balance = counts.sum() / (classes * counts)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    z = (x - mean) / std  # standardised: L-BFGS converges in a few dozen steps
    linear = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # the loss is convex: from zero, the same photos give the same head
        linear.weight.zero_()
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=20, history_size=20)
    loss_of = torch.nn.CrossEntropyLoss(weight=balance)
    rounds = max(1, math.ceil(epochs / 20))
    last_loss = math.nan

    def closure() -> torch.Tensor:
        nonlocal last_loss
        optimizer.zero_grad()
        loss = loss_of(linear(z), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        last_loss = loss.item()
        return loss

    for number in range(rounds):
        optimizer.step(closure)
        if progress is not None:
            progress(number + 1, last_loss)
    with torch.no_grad():
        # Fold the standardisation into the weights: the head takes raw embeddings.
        weight = linear.weight / std
        bias = linear.bias - (weight * mean).sum(dim=1)
    return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)


@dataclass(frozen=True)
class Report:
    """How a head does on the held-out photos."""

    categories: tuple[str, ...]
    confusion: list[list[int]]  # [true][predicted]

    @property
    def accuracy(self) -> float:
        total = sum(map(sum, self.confusion))
        return sum(self.confusion[i][i] for i in range(len(self.categories))) / max(total, 1)

    def precision_recall(self) -> dict[str, tuple[float, float, int]]:
        """Per category: precision, recall and the number of held-out photos."""
        out = {}
        for i, name in enumerate(self.categories):
            predicted = sum(row[i] for row in self.confusion)
            actual = sum(self.confusion[i])
            hit = self.confusion[i][i]
            out[name] = (
                hit / predicted if predicted else 0.0,
                hit / actual if actual else 0.0,
                actual,
            )
        return out

    def text(self) -> str:
        """The report as a table and a confusion matrix, for the terminal."""
        width = max(len(name) for name in self.categories)
        lines = [f"held-out accuracy {self.accuracy:.1%}", ""]
        lines.append(f"{'category':{width}}  precision  recall  photos")
        for name, (precision, recall, count) in self.precision_recall().items():
            lines.append(f"{name:{width}}  {precision:9.1%}  {recall:6.1%}  {count:6d}")
        lines += ["", "confusion (rows: true, columns: predicted)"]
        lines.append(" " * width + "  " + " ".join(f"{i:>4}" for i in range(len(self.categories))))
        for i, (name, row) in enumerate(zip(self.categories, self.confusion, strict=True)):
            lines.append(f"{name:{width}}  " + " ".join(f"{n:>4}" for n in row) + f"   ({i})")
        return "\n".join(lines)


def evaluate(head: LinearHead, embeddings: np.ndarray, labels: np.ndarray) -> Report:
    """The head's confusion matrix on these labelled embeddings."""
    size = len(head.categories)
    confusion = [[0] * size for _ in range(size)]
    if len(labels):
        for truth, guess in zip(labels, head.predict(embeddings).argmax(axis=1), strict=True):
            confusion[int(truth)][int(guess)] += 1
    return Report(head.categories, confusion)
