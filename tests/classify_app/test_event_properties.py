"""The ad event parser and the dead letter, against inputs nobody wrote by hand (hypothesis):
whatever arrives, the parser answers an `AdEvent` within every bound or an `InvalidEvent`
with a reason, and the dead letter of whatever arrives fits in one Kafka message."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.sinks import DeadLetters
from classify_app.metrics import Metrics
from classify_app.records import (
    MAX_EVENT_BYTES,
    MAX_ID_LENGTH,
    MAX_TITLE_LENGTH,
    MAX_URL_LENGTH,
    AdEvent,
    DeadLetter,
    InvalidEvent,
    parse_ad_event,
)
from classify_app.vocabulary import EventReason
from tests.support.records import RawEvent, RecordingSink

MAX_IMAGES = 24
KAFKA_MESSAGE_BYTES = 1_000_000
FIELDS = ["ad_id", "catalog_name", "catalog_ad_id", "images", "title", "price"]
FIELDS += ["created_at", "updated_at", "event_id", "__faust", "extra"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)
# Objects shaped like events: the real field names with values of every kind.
event_like = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(st.text()))


def check(payload: bytes | str | dict[str, Any]) -> AdEvent | None:
    """Parse; an accepted event must respect every bound."""
    try:
        event = parse_ad_event(payload, max_images=MAX_IMAGES)
    except InvalidEvent as exc:
        assert exc.reason in set(EventReason)
        assert exc.message and len(exc.message) < 2000
        return None
    for name in ("ad_id", "catalog_name", "catalog_ad_id"):
        value = getattr(event, name)
        assert 0 < len(value) <= MAX_ID_LENGTH and value.strip()
    assert 1 <= len(event.images) <= MAX_IMAGES
    assert all(0 < len(url) <= MAX_URL_LENGTH for url in event.images)
    assert event.title is None or len(event.title) <= MAX_TITLE_LENGTH
    assert event.event_id is None or len(event.event_id) <= MAX_ID_LENGTH
    for moment in (event.created_at, event.updated_at):
        assert moment is None or 0 <= moment <= time.time() + 86_400
    # Every string is valid UTF-8 (BSON, JSON and Kafka keys take it), and the event's own
    # JSON, copied into every internal record, stays small.
    encoded = json.dumps(event.asdict(), ensure_ascii=False).encode("utf-8")
    assert len(encoded) < 2 * MAX_EVENT_BYTES
    assert event.request_id()
    return event


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_a_reason(data: bytes) -> None:
    check(data)


@given(json_values)
def test_arbitrary_json_never_escapes_as_anything_but_a_reason(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(event_like)
def test_event_shaped_objects_are_accepted_only_within_bounds(value: dict[str, Any]) -> None:
    check(json.dumps(value).encode())
    check(value)


@given(
    st.sampled_from(
        [
            "[" * 60_000 + "]" * 60_000,  # nesting past the recursion limit, within the size
            '{"ad_id": ' + "9" * 5000 + "}",  # an integer past Python's digit limit
            '{"ad_id": "a", "catalog_name": "c", "images": ["http://x/a"], "price": 1'
            + "0" * 400
            + "}",  # a float overflow
            # A lone surrogate: valid JSON, but no UTF-8 (nor BSON) can carry it.
            '{"ad_id": "\\ud800", "catalog_name": "c", "images": ["http://x/a"]}',
            '{"ad_id": "a", "catalog_name": "c", "images": ["http://x/a"], "updated_at": 1e300}',
            '{"ad_id": "a", "catalog_name": "c", "images": ["http://x/a"], '
            '"updated_at": "9999-12-31T00:00:00+00:00"}',
            '{"ad_id": "a", "catalog_name": "c", "images": ["http://x/a"], "updated_at": -5}',
            '{"ad_id": "a", "catalog_name": "c", "images": ["http://x/a"], "event_id": "'
            + "e" * 1_000_000
            + '"}',
        ]
    )
)
def test_the_hostile_events_found_by_review_get_a_reason(payload: str) -> None:
    assert check(payload.encode("utf-8", "surrogatepass")) is None


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=4096),
        st.text(max_size=2048).map(lambda text: text.encode("utf-8", "surrogatepass")),
        st.integers(min_value=1, max_value=60_000).map(
            # 60,000 short URLs: the event is huge, and its JSON escapes badly.
            lambda count: json.dumps({"ad_id": "a", "images": ["\u00e9\x01"] * count}).encode()
        ),
        st.just(b"\x00" * 3_000_000),
    ),
    st.binary(max_size=5000),
)
async def test_the_dead_letter_of_anything_fits_in_one_message(payload: bytes, key: bytes) -> None:
    sink = RecordingSink()
    letters = DeadLetters(sink, Metrics(enabled=False), stage="download")
    await letters.send(RawEvent(payload, key=key), EventReason.INVALID_EVENT, "x" * 10_000)  # type: ignore[arg-type]
    [(letter_key, letter)] = sink.records
    assert isinstance(letter, DeadLetter)
    assert len(letter.dumps()) < KAFKA_MESSAGE_BYTES
    assert letter_key is None or len(letter_key) <= 1024
    assert letter.payload_bytes == len(payload)
    assert letter.payload_truncated == (len(payload) > 128 * 1024)
    if not letter.payload_truncated:  # what is kept replays the event byte for byte
        from classify_app.commands.operations import original_payload

        assert original_payload(letter) == payload
