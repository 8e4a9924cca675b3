"""The messages of the pipeline, in the order an ad meets them.

`AdEvent` (topic `ads`, JSON from the marketplace) -> `AdAccepted` / `ImageOutcome` (internal,
what became of the ad and of each image; the pixels between download and inference never leave
the worker's memory) -> `AdResult` (the results table, the `results` topic, the API). Statuses
and reason codes are `classify_app.vocabulary`'s.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional

import faust

from classify_app.identity import epoch_seconds, request_id
from classify_app.vocabulary import EventReason

MAX_ID_LENGTH = 200
MAX_URL_LENGTH = 4096


class InvalidEvent(ValueError):
    """An ad event that cannot be processed; `reason` is a stable code for the dead letter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class AdEvent(faust.Record, serializer="json", include_metadata=False):
    """A new or edited ad, as the marketplace's ad service publishes it."""

    ad_id: str
    catalog_name: str
    catalog_ad_id: str
    images: List[str]
    title: Optional[str] = None
    price: Optional[float] = None
    created_at: Optional[float] = None
    updated_at: Optional[float] = None
    event_id: Optional[str] = None

    def request_id(self) -> str:
        """Identifies this version of the ad: replays and duplicates share it, edits do not."""
        return request_id(
            ad_id=self.ad_id,
            catalog_name=self.catalog_name,
            catalog_ad_id=self.catalog_ad_id,
            images=self.images,
            updated_at=self.updated_at,
            event_id=self.event_id,
        )


def parse_ad_event(payload: bytes | str | dict[str, Any], *, max_images: int) -> AdEvent:
    """Validate a raw event (JSON bytes or a parsed object) and build the `AdEvent`."""
    if isinstance(payload, dict):
        data: Any = payload
    else:
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidEvent(
                EventReason.MALFORMED_JSON, f"the event is not valid JSON: {exc}"
            ) from None
    if not isinstance(data, dict):
        raise InvalidEvent(EventReason.INVALID_EVENT, "the event must be a JSON object")
    data = {k: v for k, v in data.items() if k != "__faust"}
    unknown = sorted(set(data) - set(AdEvent._options.fields))
    if unknown:
        raise InvalidEvent(EventReason.INVALID_EVENT, f"unknown fields: {', '.join(unknown)}")
    ad_id = _identifier(data, "ad_id")
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise InvalidEvent(EventReason.INVALID_EVENT, "images must be a non-empty list of URLs")
    if len(images) > max_images:
        raise InvalidEvent(
            EventReason.TOO_MANY_IMAGES, f"{len(images)} images, the limit is {max_images}"
        )
    for url in images:
        if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
            raise InvalidEvent(EventReason.INVALID_EVENT, "every image must be a URL string")
    return AdEvent(
        ad_id=ad_id,
        catalog_name=_identifier(data, "catalog_name"),
        catalog_ad_id=_identifier(data, "catalog_ad_id", default=ad_id),
        images=images,
        title=_optional(data, "title", str),
        price=_number(data, "price"),
        created_at=_timestamp(data, "created_at"),
        updated_at=_timestamp(data, "updated_at"),
        event_id=_optional(data, "event_id", str),
    )


def _identifier(data: dict[str, Any], name: str, default: str | None = None) -> str:
    value = data.get(name, default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(
            EventReason.INVALID_EVENT,
            f"{name} must be a non-empty string of at most {MAX_ID_LENGTH} chars",
        )
    return value


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidEvent(EventReason.INVALID_EVENT, f"{name} must be a {kind.__name__}")
    return value


def _number(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidEvent(EventReason.INVALID_EVENT, f"{name} must be a finite number")
    return float(value)


def _timestamp(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if isinstance(value, str):
        try:
            return epoch_seconds(value)
        except ValueError as exc:
            raise InvalidEvent(EventReason.INVALID_EVENT, f"{name}: {exc}") from None
    return _number(data, name)


class AdRef(faust.Record, serializer="json", include_metadata=False):
    """The identity of one classification request, carried by every internal message.

    `version` orders the requests for one ad (the event's `updated_at`, else the time it was
    produced); `submitted_at` is when it was produced, the start of the end-to-end latency.
    """

    ad_id: str
    request_id: str
    catalog_name: str
    catalog_ad_id: str
    image_count: int
    version: float
    submitted_at: float
    accepted_at: float


class ImageRetry(faust.Record, serializer="json", include_metadata=False):
    """An image whose download failed transiently, to be tried again at `due_at`."""

    ad: AdRef
    index: int
    url: str
    attempt: int
    due_at: float
    reason: str
    message: str


class Label(faust.Record, serializer="json", include_metadata=False):
    """A raw model label and its probability: the wire form of `vocabulary.Label`."""

    name: str
    score: float


class ImageError(faust.Record, serializer="json", include_metadata=False):
    """Why an image has no prediction: a stable reason code and a readable message."""

    reason: str
    message: str


class AdAccepted(faust.Record, serializer="json"):
    """The download stage took an ad in: its result is pending from now on."""

    ad: AdRef


class ImageOutcome(faust.Record, serializer="json"):
    """What became of one image: a prediction, or an error."""

    ad: AdRef
    index: int
    url: str
    labels: List[Label] = []
    category: Optional[str] = None
    category_scores: Dict[str, float] = {}
    error: Optional[ImageError] = None
    model: Optional[str] = None
    model_version: Optional[str] = None
    timings: Dict[str, float] = {}


class ImageResult(faust.Record, serializer="json", include_metadata=False):
    """One image's part of an ad result."""

    index: int
    url: str
    status: str
    labels: List[Label] = []
    category: Optional[str] = None
    category_scores: Dict[str, float] = {}
    error: Optional[ImageError] = None
    timings: Dict[str, float] = {}


class AdResult(faust.Record, serializer="json", include_metadata=False):
    """The classification of one ad, as served by the API and published on `results`."""

    ad_id: str
    request_id: str
    catalog_name: str
    catalog_ad_id: str
    status: str
    image_count: int
    images: List[ImageResult] = []
    category: Optional[str] = None
    category_scores: Dict[str, float] = {}
    model: Optional[str] = None
    model_version: Optional[str] = None
    version: float = 0.0
    submitted_at: float = 0.0
    accepted_at: float = 0.0
    completed_at: Optional[float] = None
    latency_seconds: Optional[float] = None


class DeadLetter(faust.Record, serializer="json", include_metadata=False):
    """An event that could not be processed, kept with its reason and original payload."""

    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    payload: str
    failed_at: float
