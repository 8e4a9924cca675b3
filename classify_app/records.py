"""The messages of the pipeline, in the order an ad meets them.

`AdEvent` (topic `ads`, JSON from the marketplace) -> `AdAccepted` / `ImageOutcome` (internal,
what became of the ad and of each image; the pixels between download and inference never leave
the worker's memory) -> `AdResult` (the results table, the `results` topic, the API). Statuses
and reason codes are `classify_app.vocabulary`'s.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from typing import Any, Dict, List, Optional

import faust

from classify_app.identity import epoch_seconds, request_id
from classify_app.vocabulary import EventReason

MAX_ID_LENGTH = 200
MAX_URL_LENGTH = 4096
MAX_TITLE_LENGTH = 1000
MAX_PRICE = 1e15
# The raw ad event: 24 URLs of 4 KB and every other field at its limit fit well within it.
MAX_EVENT_BYTES = 128 * 1024
MAX_FUTURE_SECONDS = 86_400
# Of a dead letter: JSON escaping can make its text up to 6 times as long, still under the
# 1 MB a Kafka producer sends by default.
MAX_DEAD_LETTER_PAYLOAD = 128 * 1024
MAX_DEAD_LETTER_MESSAGE = 2000
MAX_DEAD_LETTER_KEY = 1024


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


class EventShape:
    """Where a marketplace's own ad event keeps the fields of ours: `CLASSIFY_EVENT_FIELDS`,
    e.g. `ad_id=id,catalog_name=category.slug,images=photos[].url,updated_at=modified`.

    A path is field names joined by dots; `name[]` is a list, the rest of the path applied to
    each element (`photos[].url`: the `url` of every photo). A field of ours not mapped, or
    not found where it is mapped, is read under its own name (so events in our own shape, as
    `POST /classify` publishes them, still parse). Their fields nothing reads are unknown.
    """

    PATH = re.compile(r"[A-Za-z0-9_$@-]+(\[\])?(\.[A-Za-z0-9_$@-]+(\[\])?)*")

    def __init__(self, spec: str = "") -> None:
        self.paths: dict[str, list[tuple[str, bool]]] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            ours, equals, theirs = (text.strip() for text in item.partition("="))
            if not equals or ours not in AD_EVENT_FIELDS:
                raise ValueError(
                    f"{item!r}: expected FIELD=PATH with FIELD one of {', '.join(AD_EVENT_FIELDS)}"
                )
            if ours in self.paths:
                raise ValueError(f"{ours} is mapped twice")
            if not self.PATH.fullmatch(theirs) or theirs.count("[]") > 1:
                raise ValueError(
                    f"{item!r}: a path is names joined by dots, with at most one list (name[])"
                )
            self.paths[ours] = [
                (name.removesuffix("[]"), name.endswith("[]")) for name in theirs.split(".")
            ]

    def apply(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Our fields found in `data`, and the names of its top-level fields nothing read."""
        ours: dict[str, Any] = {}
        read: set[str] = set()
        for field in AD_EVENT_FIELDS:
            path = self.paths.get(field, [(field, False)])
            read.update((path[0][0], field))
            value = _follow(data, path)
            if value is _MISSING:  # an event in our own shape (`POST /classify` writes them)
                value = data.get(field, _MISSING)
            if value is not _MISSING:
                ours[field] = value
        return ours, [name for name in data if name not in read and name != "__faust"]


_MISSING = object()


def _follow(value: Any, path: list[tuple[str, bool]]) -> Any:
    for position, (name, is_list) in enumerate(path):
        if not isinstance(value, dict) or name not in value:
            return _MISSING
        value = value[name]
        if is_list:
            if not isinstance(value, list):
                return value  # not a list: the field's own check says what is wrong
            rest = path[position + 1 :]
            items = [_follow(item, rest) if rest else item for item in value]
            return [item for item in items if item is not _MISSING] if rest else items
    return value


def parse_ad_event(
    payload: bytes | str | dict[str, Any],
    *,
    max_images: int,
    max_bytes: int = MAX_EVENT_BYTES,
    now: float | None = None,
    shape: EventShape | None = None,
    strict: bool = False,
    on_unknown: Callable[[list[str]], None] | None = None,
) -> AdEvent:
    """Validate a raw event (JSON bytes or a parsed object) and build the `AdEvent`.

    Raises `InvalidEvent`, and nothing else, whatever it is given: every field is bounded
    (so every record the event causes is bounded too), every string is valid Unicode, every
    time lies between the epoch and a day after `now`. `shape` says where the marketplace's
    event keeps our fields. Fields nothing reads are ignored (`on_unknown` hears their names),
    or, when `strict`, a reason to refuse the event.
    """
    if isinstance(payload, dict):
        data: Any = payload
    else:
        size = len(
            payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        )
        if size > max_bytes:
            raise InvalidEvent(
                EventReason.TOO_LARGE, f"the event is {size} bytes, the limit is {max_bytes}"
            )
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, Unicode, huge integers
            raise InvalidEvent(
                EventReason.MALFORMED_JSON, f"the event is not valid JSON: {_short(exc)}"
            ) from None
    if not isinstance(data, dict):
        raise InvalidEvent(EventReason.INVALID_EVENT, "the event must be a JSON object")
    data, unknown = (shape or PLAIN_SHAPE).apply(data)
    if unknown:
        if strict:
            names = ", ".join(_printable(name, MAX_ID_LENGTH) for name in sorted(unknown)[:10])
            raise InvalidEvent(EventReason.INVALID_EVENT, f"unknown fields: {names}")
        if on_unknown is not None:
            on_unknown(unknown)
    ad_id = _identifier(data, "ad_id")
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise InvalidEvent(EventReason.INVALID_EVENT, "images must be a non-empty list of URLs")
    if len(images) > max_images:
        raise InvalidEvent(
            EventReason.TOO_MANY_IMAGES, f"{len(images)} images, the limit is {max_images}"
        )
    for url in images:
        if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH or not _encodable(url):
            raise InvalidEvent(
                EventReason.INVALID_EVENT,
                f"every image must be a URL string of at most {MAX_URL_LENGTH} characters",
            )
    now = time.time() if now is None else now
    return AdEvent(
        ad_id=ad_id,
        catalog_name=_identifier(data, "catalog_name"),
        catalog_ad_id=_identifier(data, "catalog_ad_id", default=ad_id),
        images=images,
        title=_text(data, "title", MAX_TITLE_LENGTH),
        price=_number(data, "price", MAX_PRICE),
        created_at=_timestamp(data, "created_at", now),
        updated_at=_timestamp(data, "updated_at", now),
        event_id=_text(data, "event_id", MAX_ID_LENGTH),
    )


def _identifier(data: dict[str, Any], name: str, default: str | None = None) -> str:
    value = data.get(name, default)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**MAX_ID_LENGTH:
        value = str(value)
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_ID_LENGTH
        or not _encodable(value)
    ):
        raise InvalidEvent(
            EventReason.INVALID_EVENT,
            f"{name} must be a non-empty string of at most {MAX_ID_LENGTH} characters",
        )
    return value


def _text(data: dict[str, Any], name: str, limit: int) -> str | None:
    value = data.get(name)
    if value is not None and (
        not isinstance(value, str) or len(value) > limit or not _encodable(value)
    ):
        raise InvalidEvent(
            EventReason.INVALID_EVENT, f"{name} must be a string of at most {limit} characters"
        )
    return value


def _number(data: dict[str, Any], name: str, limit: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, int | float) else math.nan
    except OverflowError:  # an integer too large for a float
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or abs(number) > limit:
        raise InvalidEvent(
            EventReason.INVALID_EVENT, f"{name} must be a number between -{limit:g} and {limit:g}"
        )
    return number


def _timestamp(data: dict[str, Any], name: str, now: float) -> float | None:
    """Epoch seconds, or an ISO-8601 string with a time zone; not before the epoch and not
    more than a day ahead of `now` (a far-future time would make the ad impossible to edit)."""
    value = data.get(name)
    if isinstance(value, str):
        try:
            seconds = epoch_seconds(value[:64])
        except (ValueError, OverflowError) as exc:
            raise InvalidEvent(EventReason.INVALID_EVENT, f"{name}: {exc}") from None
    else:
        seconds = _number(data, name, MAX_PRICE)
    if seconds is not None and not 0 <= seconds <= now + MAX_FUTURE_SECONDS:
        raise InvalidEvent(
            EventReason.INVALID_EVENT,
            f"{name} must lie between 1970 and one day from now, not {seconds:.0f}",
        )
    return seconds


def _encodable(text: str) -> bool:
    """False for strings JSON can carry but UTF-8 (and so BSON) cannot: lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str, limit: int) -> str:
    return repr(
        text[:limit].encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    )


def _short(exc: BaseException) -> str:
    return str(exc)[:200]


AD_EVENT_FIELDS: tuple[str, ...] = tuple(AdEvent._options.fields)


def ad_event_schema(*, max_images: int, strict: bool = False) -> dict[str, Any]:
    """The JSON Schema of an ad event in our own shape, from the bounds `parse_ad_event`
    enforces (`docs/ad-event.schema.json` is this, with the default settings; a test keeps
    the two and the parser in agreement). Beyond what a schema can say, the parser also
    refuses blank identifiers, lone surrogates, and times more than a day ahead."""
    identifier = {
        "oneOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
            {
                "type": "integer",
                "minimum": -(10**MAX_ID_LENGTH - 1),
                "maximum": 10**MAX_ID_LENGTH - 1,
            },
        ]
    }
    moment = {
        "oneOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "format": "date-time", "maxLength": 64},
            {"type": "null"},
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/classify-app/classify-app/docs/ad-event.schema.json",
        "title": "Ad event",
        "description": "A new or edited ad, as the marketplace's ad service publishes it (Kafka "
        "key: the ad id). Fields not listed are ignored"
        + (" (refused: strict mode)." if strict else " (CLASSIFY_STRICT_EVENTS refuses them).")
        + " A marketplace's own shape maps onto this one with CLASSIFY_EVENT_FIELDS.",
        "type": "object",
        "required": ["ad_id", "catalog_name", "images"],
        "additionalProperties": not strict,
        "properties": {
            "ad_id": {**identifier, "description": "The ad's id."},
            "catalog_name": {**identifier, "description": "The catalog (section) of the ad."},
            "catalog_ad_id": {
                **identifier,
                "description": "The ad's id in its catalog (default: ad_id).",
            },
            "images": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_images,
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_URL_LENGTH},
                "description": "Image URLs (http and https are fetched).",
            },
            "title": {"type": ["string", "null"], "maxLength": MAX_TITLE_LENGTH},
            "price": {"type": ["number", "null"], "minimum": -MAX_PRICE, "maximum": MAX_PRICE},
            "created_at": moment,
            "updated_at": {
                **moment,
                "description": "Epoch seconds or ISO-8601 with a time zone; orders the edits "
                "of an ad (default: when the event was produced).",
            },
            "event_id": {
                "type": ["string", "null"],
                "maxLength": MAX_ID_LENGTH,
                "description": "Identifies this version (default: a hash of the ad's fields).",
            },
        },
    }


PLAIN_SHAPE = EventShape()


class AdRef(faust.Record, serializer="json", include_metadata=False):
    """The identity of one classification request, carried by every internal message.

    `version` orders the requests for one ad (the event's `updated_at`, else the time it was
    produced); `submitted_at` is when it was produced, the start of the end-to-end latency.
    `title` and `price` are carried for the model tasks that read them.
    """

    ad_id: str
    request_id: str
    catalog_name: str
    catalog_ad_id: str
    image_count: int
    version: float
    submitted_at: float
    accepted_at: float
    title: Optional[str] = None
    price: Optional[float] = None


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
    # Each model task's output under its name: {"task", "version", ...} or with "error".
    outputs: Dict[str, Any] = {}


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
    outputs: Dict[str, Any] = {}


class Duplicate(faust.Record, serializer="json", include_metadata=False):
    """An image of an earlier ad that an image of this ad nearly repeats (similarity index)."""

    ad_id: str  # the earlier ad
    image_index: int  # this ad's image
    matched_image_index: int  # the earlier ad's image
    score: float  # cosine similarity of their embeddings


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
    # What the model tasks flagged on any of its images, e.g. ["nsfw"].
    flags: List[str] = []
    # Images of earlier ads its images nearly repeat (`CLASSIFY_SIMILARITY`).
    duplicates: List[Duplicate] = []


class ImageVector(faust.Record, serializer="json", include_metadata=False):
    """One image's embedding: float16, little-endian, base64 (the embedding task's)."""

    index: int
    vector: str


class AdVectors(faust.Record, serializer="json", include_metadata=False):
    """What the similarity index holds of an ad: the embeddings of its classified images, on
    the compacted vectors topic (key: ad id; the newest request of an ad replaces the older,
    and no images removes the ad)."""

    ad_id: str
    request_id: str
    catalog_name: str
    version: float
    submitted_at: float
    images: List[ImageVector] = []
    # When the ad's first request was produced: an edit keeps it, so that the original of a
    # copied photo stays the earlier ad after its seller edits it (0: `submitted_at`).
    first_submitted_at: float = 0.0

    @classmethod
    def of(cls, result: AdResult, first_submitted_at: float | None = None) -> AdVectors:
        """The vectors of a final result's classified images."""
        return cls(
            ad_id=result.ad_id,
            request_id=result.request_id,
            catalog_name=result.catalog_name,
            version=result.version,
            submitted_at=result.submitted_at,
            first_submitted_at=min(first_submitted_at or result.submitted_at, result.submitted_at),
            images=[
                ImageVector(index=image.index, vector=embedding["vector"])
                for image in result.images
                if image.status == "done"
                and isinstance(embedding := image.outputs.get("embedding"), dict)
                and isinstance(embedding.get("vector"), str)
            ],
        )


class DeadLetter(faust.Record, serializer="json", include_metadata=False):
    """An event that could not be processed, kept with why, where it was, and its original key
    and payload (as text, or `base64:...` for bytes that are not UTF-8).

    A letter always fits in one Kafka message: a payload of more than `MAX_DEAD_LETTER_PAYLOAD`
    bytes keeps its first bytes only (`payload_truncated`; such an event cannot be replayed,
    and would be refused again), and `payload_bytes` and `payload_sha256` identify the whole.
    """

    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    payload: str
    failed_at: float
    stage: str = ""
    key: Optional[str] = None
    payload_bytes: int = 0
    payload_sha256: str = ""
    payload_truncated: bool = False
