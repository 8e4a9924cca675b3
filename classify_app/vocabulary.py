"""The words the service and its users share: result statuses and every failure reason code.

Defined once here and imported by the worker's stages, the SDK and the OpenAPI document; the
reason table in `docs/schemas.md` is generated from it (`python -m classify_app.vocabulary`),
and a test fails when the two differ. Pure Python: the SDK imports this without the worker's
dependencies, and `models/` may import it without importing anything that builds an app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """Where an ad's (or one image's) classification stands."""

    PENDING = "pending"  # some images have no outcome yet
    DONE = "done"  # every image classified
    PARTIAL = "partial"  # some images classified, some failed
    FAILED = "failed"  # no image classified


FINAL_STATUSES = frozenset({Status.DONE, Status.PARTIAL, Status.FAILED})
IMAGE_STATUSES = (Status.DONE, Status.FAILED)


@dataclass(frozen=True)
class Label:
    """One raw label of a model and its probability."""

    name: str
    score: float


class ImageReason(StrEnum):
    """Why one image has no prediction (`images[].error.reason` of a result)."""

    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    FORBIDDEN_ADDRESS = "forbidden_address"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_ERROR = "http_error"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
    MODEL_INPUT_MISMATCH = "model_input_mismatch"
    INFERENCE_ERROR = "inference_error"
    TASK_ERROR = "task_error"
    INTERNAL_ERROR = "internal_error"


HTTP_STATUS_REASON = re.compile(r"http_[1-5][0-9]{2}")


def http_reason(status: int) -> str:
    """The reason code of an image server's error answer: `http_<status>`."""
    return f"http_{status}"


class EventReason(StrEnum):
    """Why an event went to the dead-letter topic (`DeadLetter.reason`)."""

    TOO_LARGE = "event_too_large"
    MALFORMED_JSON = "malformed_json"
    INVALID_EVENT = "invalid_event"
    TOO_MANY_IMAGES = "too_many_images"
    STORE_REJECTED = "store_rejected"
    INTERNAL_ERROR = "internal_error"


class ApiError(StrEnum):
    """The `error` code of an HTTP error answer (an event refused by `POST /classify` answers
    with its `EventReason` instead)."""

    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    UNKNOWN_AD = "unknown_ad"
    OWNER_UNREACHABLE = "owner_unreachable"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_DISABLED = "store_disabled"
    INVALID_QUERY = "invalid_query"
    METRICS_DISABLED = "metrics_disabled"
    BROKER_UNAVAILABLE = "broker_unavailable"
    SIMILARITY_DISABLED = "similarity_disabled"
    SIMILARITY_WARMING = "similarity_warming"
    NO_SAVED_INDEX = "no_saved_index"
    IMAGE_REFUSED = "image_refused"


# Worth another download later: the server or the network may recover. Every other image
# failure (4xx, not an image, too large, forbidden) would fail the same way again.
TRANSIENT_IMAGE_REASONS = frozenset(
    {ImageReason.TIMEOUT, ImageReason.CONNECTION_ERROR, "http_408", "http_429"}
)


def is_transient(reason: str) -> bool:
    """True for an image failure that a later download may not meet."""
    return reason in TRANSIENT_IMAGE_REASONS or reason.startswith("http_5")


MEANINGS: dict[str, str] = {
    ImageReason.INVALID_URL: "the URL cannot be parsed, is not absolute or has no host",
    ImageReason.UNSUPPORTED_SCHEME: "only http and https URLs are fetched",
    ImageReason.FORBIDDEN_ADDRESS: "the host is (or resolves to) a private, loopback, "
    "link-local or otherwise non-public address",
    ImageReason.CONNECTION_ERROR: "the image server could not be reached (retried)",
    ImageReason.TIMEOUT: "no complete answer within `CLASSIFY_DOWNLOAD_TIMEOUT_S` (retried)",
    ImageReason.TOO_MANY_REDIRECTS: "more than `CLASSIFY_DOWNLOAD_MAX_REDIRECTS` redirects",
    ImageReason.HTTP_ERROR: "the image server's answer broke the HTTP protocol",
    "http_<status>": "the image server answered with this error status (5xx, 408 and 429 "
    "are retried)",
    ImageReason.TOO_LARGE: "more bytes than `CLASSIFY_DOWNLOAD_MAX_BYTES`",
    ImageReason.NOT_AN_IMAGE: "the content is not a JPEG, PNG, WebP, GIF, BMP or TIFF image",
    ImageReason.CORRUPT_IMAGE: "the image header or data is broken",
    ImageReason.TOO_MANY_PIXELS: "more pixels than `CLASSIFY_MAX_IMAGE_PIXELS` (checked on "
    "the header, before decoding), or more memory to decode than `CLASSIFY_DECODE_MEMORY_BYTES`",
    ImageReason.EXTREME_ASPECT_RATIO: "one side is more than `CLASSIFY_MAX_IMAGE_ASPECT_RATIO` "
    "times the other",
    ImageReason.MODEL_INPUT_MISMATCH: "the prepared image has a shape the model does not take",
    ImageReason.INFERENCE_ERROR: "the model failed on the image's batch",
    ImageReason.TASK_ERROR: "one model task failed on the image (in `outputs.<task>."
    "error`; the other tasks' outputs and the image's status stand)",
    ImageReason.INTERNAL_ERROR: "a defect of the worker; the message says what failed",
    EventReason.TOO_LARGE: "the raw event is larger than `CLASSIFY_MAX_EVENT_BYTES`",
    EventReason.MALFORMED_JSON: "the event is not valid JSON (UTF-8, nesting and numbers "
    "within Python's limits)",
    EventReason.INVALID_EVENT: "a field is missing, unknown, of the wrong type or outside "
    "its bounds (lengths, numbers, times, valid Unicode)",
    EventReason.TOO_MANY_IMAGES: "more images than `CLASSIFY_MAX_IMAGES_PER_AD`",
    EventReason.STORE_REJECTED: "MongoDB refused the result for good (its catalog key "
    "belongs to another ad)",
    ApiError.UNAUTHORIZED: "a valid bearer token is required (`CLASSIFY_API_TOKEN`)",
    ApiError.TOO_LARGE: "the request body is larger than the limit",
    ApiError.UNKNOWN_AD: "no result for this ad (404)",
    ApiError.OWNER_UNREACHABLE: "the worker owning the ad's partition did not answer; the "
    "group is probably rebalancing (503, retry)",
    ApiError.STORE_UNAVAILABLE: "MongoDB did not answer (503, retry)",
    ApiError.STORE_DISABLED: "this deployment keeps no MongoDB store (501)",
    ApiError.INVALID_QUERY: "the query parameters do not form a lookup (400)",
    ApiError.METRICS_DISABLED: "`CLASSIFY_METRICS` is false (404)",
    ApiError.BROKER_UNAVAILABLE: "the broker did not take the submitted ad (503, retry)",
    ApiError.SIMILARITY_DISABLED: "`CLASSIFY_SIMILARITY` is false (501)",
    ApiError.SIMILARITY_WARMING: "the similarity index is still reading the vectors topic "
    "(503, retry)",
    ApiError.IMAGE_REFUSED: "the photo given by URL could not be used; the message starts "
    "with its image reason code (422)",
    ApiError.NO_SAVED_INDEX: "this worker has no saved similarity index to copy, or a newer "
    "save replaced the one asked for (404)",
}


def image_reasons() -> list[str]:
    """Every image reason code, `http_<status>` standing for the HTTP statuses."""
    codes: list[str] = list(ImageReason)
    codes.insert(codes.index(ImageReason.HTTP_ERROR) + 1, "http_<status>")
    return codes


def reason_table() -> str:
    """The Markdown table of every reason code, as `docs/schemas.md` carries it."""
    rows = ["| where | code | meaning |", "|---|---|---|"]
    groups = (
        ("image (`images[].error.reason`)", image_reasons()),
        ("dead letter (`reason`)", list(EventReason)),
        ("HTTP error (`error`)", list(ApiError)),
    )
    for where, codes in groups:
        rows.extend(f"| {where} | `{code}` | {MEANINGS[code]} |" for code in codes)
    return "\n".join(rows)


if __name__ == "__main__":
    print(reason_table())
