"""The request id: which version of an ad a result belongs to.

Shared by the worker (`records.AdEvent.request_id`) and the client (which submits to Kafka
without Faust and must know the id the worker will give), so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from urllib.parse import quote


def request_id(
    *,
    ad_id: str,
    catalog_name: str,
    catalog_ad_id: str,
    images: list[str],
    updated_at: float | None,
    event_id: str | None,
) -> str:
    """The event's own id, else a hash of what makes this version: replays and duplicates
    share it, edits do not. Takes the values as `records.parse_ad_event` normalises them."""
    if event_id:
        return event_id
    identity = [ad_id, catalog_name, catalog_ad_id, images, updated_at]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def epoch_seconds(value: float | str | None) -> float | None:
    """A time as an ad event may give it, in epoch seconds: a number, or an ISO-8601 string
    with a time zone. Raises `ValueError` saying why for any other string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO-8601 time") from None
        if parsed.tzinfo is None:
            raise ValueError("an ISO-8601 time must carry a time zone")
        return parsed.timestamp()
    return float(value)


def result_path(ad_id: str) -> str:
    """The URL path of an ad's result, its id percent-encoded (`a?b` must not read ad `a`)."""
    return f"/classify/results/{quote(ad_id, safe='')}"
