"""Validation of incoming ad events: clear reasons, no surprises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from classify_app.records import AdEvent, EventShape, InvalidEvent, ad_event_schema, parse_ad_event
from classify_app.sdk.client import _request_id
from classify_app.settings import Settings, SettingsError

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


def test_unknown_fields_are_ignored_and_heard_of_or_refused_when_strict() -> None:
    event = {**VALID, "colour": "blue", "seller": {"id": 7}}
    heard: list[list[str]] = []
    ad = parse_ad_event(event, max_images=10, on_unknown=heard.append)
    assert ad.ad_id == "a-1" and sorted(heard[0]) == ["colour", "seller"]
    with pytest.raises(InvalidEvent) as caught:
        parse_ad_event(event, max_images=10, strict=True)
    assert caught.value.reason == "invalid_event" and "colour" in caught.value.message


# Two ad services' own events, as such services publish them.
CLASSIFIEDS: dict[str, Any] = {
    "id": 42,
    "category": {"slug": "cars", "name": "Cars & vans"},
    "photos": [
        {"url": "https://img.example.com/42/1.jpg", "w": 800},
        {"url": "https://img.example.com/42/2.jpg"},
    ],
    "modified": "2026-11-30T10:00:00+00:00",
    "headline": "Audi A4, 2017",
    "seller": {"id": 7, "rating": 4.8},
}
CLASSIFIEDS_SHAPE = (
    "ad_id=id,catalog_name=category.slug,images=photos[].url,updated_at=modified,title=headline"
)
LISTINGS = {
    "listing": {"uuid": "9f1c", "section": "furniture", "external_ref": "SKU-77"},
    "media": {"images": ["https://cdn.example.org/9f1c/a.webp"]},
    "pricing": {"amount": 120.5, "currency": "EUR"},
    "event": {"id": "evt-1", "at": 1795000000},
}
LISTINGS_SHAPE = (
    "ad_id=listing.uuid,catalog_name=listing.section,catalog_ad_id=listing.external_ref,"
    "images=media.images,price=pricing.amount,event_id=event.id,updated_at=event.at"
)


def test_a_marketplaces_own_event_shapes_map_onto_ours() -> None:
    heard: list[list[str]] = []
    ad = parse_ad_event(
        CLASSIFIEDS, max_images=10, shape=EventShape(CLASSIFIEDS_SHAPE), on_unknown=heard.append
    )
    assert (ad.ad_id, ad.catalog_name, ad.title) == ("42", "cars", "Audi A4, 2017")
    assert ad.images == [photo["url"] for photo in CLASSIFIEDS["photos"]]
    assert ad.updated_at == pytest.approx(1796032800.0) and heard == [["seller"]]
    other = parse_ad_event(LISTINGS, max_images=10, shape=EventShape(LISTINGS_SHAPE))
    assert (other.ad_id, other.catalog_ad_id, other.price, other.event_id) == (
        "9f1c",
        "SKU-77",
        120.5,
        "evt-1",
    )
    # Events in our own shape (POST /classify writes them) still parse under a mapping.
    assert parse_ad_event(VALID, max_images=10, shape=EventShape(LISTINGS_SHAPE)).ad_id == "a-1"
    # A field found where it is mapped, but wrong, gets its reason.
    broken = {**CLASSIFIEDS, "photos": [{"w": 800}]}
    with pytest.raises(InvalidEvent, match="images"):
        parse_ad_event(broken, max_images=10, shape=EventShape(CLASSIFIEDS_SHAPE))


@pytest.mark.parametrize(
    "spec", ["ad_id", "colour=x", "ad_id=", "ad_id=a..b", "ad_id=a[].b[].c", "ad_id=x,ad_id=y"]
)
def test_a_field_mapping_is_refused_at_start_with_why(spec: str) -> None:
    with pytest.raises(SettingsError, match="CLASSIFY_EVENT_FIELDS"):
        Settings(event_fields=spec).validate()


def test_the_published_schema_is_the_one_the_code_makes() -> None:
    published = json.loads(
        (Path(__file__).parents[2] / "docs" / "ad-event.schema.json").read_text()
    )
    assert published == ad_event_schema(max_images=Settings().max_images_per_ad)
    Draft202012Validator.check_schema(published)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "ad_id": st.one_of(st.text(max_size=5), st.integers(), json_values),
        "catalog_name": st.one_of(st.text(max_size=5), json_values),
        "images": st.one_of(st.lists(st.text(max_size=20), max_size=30), json_values),
        "price": st.one_of(st.floats(), st.integers(), json_values),
        "updated_at": st.one_of(
            st.integers(min_value=-10, max_value=2_000_000_000), st.text(max_size=30)
        ),
        "title": json_values,
        "event_id": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=300)
@given(events)
def test_every_event_the_parser_takes_the_schema_takes(event: dict) -> None:
    validator = Draft202012Validator(ad_event_schema(max_images=24), format_checker=FormatChecker())
    try:
        parse_ad_event(event, max_images=24)
    except InvalidEvent:
        return
    errors = [error.message for error in validator.iter_errors(event)]
    assert errors == [], event
