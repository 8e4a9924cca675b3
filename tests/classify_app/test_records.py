"""Validation of incoming ad events: clear reasons, no surprises."""

from __future__ import annotations

import json

import pytest

from classify_app.records import AdEvent, InvalidEvent, parse_ad_event
from classify_app.sdk.client import _request_id

VALID = {
    "ad_id": "a-1",
    "catalog_name": "cars",
    "catalog_ad_id": "c-1",
    "images": ["http://img.example/1.jpg"],
    "title": "Blue car",
    "price": 1200,
    "updated_at": "2026-11-27T10:00:00+00:00",
}


def test_a_valid_event_parses_from_bytes() -> None:
    ad = parse_ad_event(json.dumps(VALID).encode(), max_images=10)
    assert isinstance(ad, AdEvent)
    assert ad.ad_id == "a-1" and ad.price == 1200.0
    assert ad.updated_at == pytest.approx(1795773600.0)


def test_catalog_ad_id_defaults_to_ad_id_and_numbers_become_strings() -> None:
    ad = parse_ad_event({"ad_id": 42, "catalog_name": "x", "images": ["http://a/b"]}, max_images=5)
    assert ad.ad_id == "42" and ad.catalog_ad_id == "42"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "invalid_event"),
        (json.dumps({**VALID, "images": []}).encode(), "invalid_event"),
        (json.dumps({**VALID, "images": "http://a/b"}).encode(), "invalid_event"),
        (json.dumps({**VALID, "images": [1]}).encode(), "invalid_event"),
        (json.dumps({**VALID, "ad_id": ""}).encode(), "invalid_event"),
        (json.dumps({**VALID, "ad_id": None}).encode(), "invalid_event"),
        (json.dumps({**VALID, "price": "cheap"}).encode(), "invalid_event"),
        (json.dumps({**VALID, "updated_at": "yesterday"}).encode(), "invalid_event"),
        (json.dumps({**VALID, "updated_at": "2026-11-27T10:00:00"}).encode(), "invalid_event"),
        (json.dumps({**VALID, "colour": "blue"}).encode(), "invalid_event"),
        (json.dumps({**VALID, "images": ["http://a/b"] * 11}).encode(), "too_many_images"),
    ],
    ids=[
        "malformed",
        "not-utf8",
        "not-object",
        "no-images",
        "images-not-list",
        "image-not-string",
        "empty-id",
        "null-id",
        "price-text",
        "bad-time",
        "naive-time",
        "unknown-field",
        "too-many-images",
    ],
)
def test_invalid_events_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_ad_event(payload, max_images=10)
    assert caught.value.reason == reason
    assert caught.value.message


def test_request_id_is_stable_for_replays_and_changes_with_edits() -> None:
    first = parse_ad_event(VALID, max_images=10)
    replay = parse_ad_event(dict(VALID), max_images=10)
    edited = parse_ad_event({**VALID, "images": ["http://img.example/2.jpg"]}, max_images=10)
    assert first.request_id() == replay.request_id()
    assert first.request_id() != edited.request_id()
    assert parse_ad_event({**VALID, "event_id": "e-9"}, max_images=10).request_id() == "e-9"


@pytest.mark.parametrize(
    "event",
    [
        {"ad_id": "a", "catalog_name": "c", "images": ["http://img/1"]},
        {"ad_id": 7, "catalog_name": "c", "images": ["http://img/1"], "updated_at": 5},
        {
            "ad_id": "a",
            "catalog_name": "c",
            "catalog_ad_id": 9,
            "images": ["http://img/1"],
            "updated_at": "2026-01-01T00:00:00+00:00",
        },
        {"ad_id": "a", "catalog_name": "c", "images": ["http://img/1"], "event_id": "e-1"},
    ],
)
def test_the_client_knows_the_request_id_the_worker_gives(event: dict) -> None:
    assert _request_id(event) == parse_ad_event(event, max_images=24).request_id()
