"""The merge rule of the results table: replays are harmless, edits win, statuses add up."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from classify_app.records import AdAccepted, AdRef, AdResult, ImageError, ImageOutcome
from tables.merge import is_final, merge
from tests.support.records import ad_ref as ref
from tests.support.records import image_success as success


def failure(ad: AdRef, index: int) -> ImageOutcome:
    return ImageOutcome(
        ad=ad, index=index, url="http://img/x", error=ImageError(reason="http_404", message="gone")
    )


def test_accepted_ad_is_pending() -> None:
    result = merge(None, AdAccepted(ad=ref()), now=101.0)
    assert result is not None and result.status == "pending" and not is_final(result)
    assert merge(result, AdAccepted(ad=ref()), now=102.0) is None


def test_ad_is_done_when_every_image_is_classified() -> None:
    ad = ref()
    pending = merge(None, success(ad, 0), now=100.5)
    assert pending is not None and pending.status == "pending"
    done = merge(pending, success(ad, 1), now=100.7)
    assert done is not None and done.status == "done"
    assert done.category == "vehicles"
    assert done.completed_at == 100.7 and done.latency_seconds == 0.7
    assert [image.index for image in done.images] == [0, 1]
    assert done.model == "m" and done.model_version == "1"


def test_partial_and_failed() -> None:
    ad = ref()
    partial = merge(merge(None, success(ad, 0), now=101.0), failure(ad, 1), now=101.0)
    assert partial is not None and partial.status == "partial"
    assert partial.images[1].error is not None and partial.images[1].error.reason == "http_404"
    failed = merge(merge(None, failure(ad, 0), now=101.0), failure(ad, 1), now=101.0)
    assert failed is not None and failed.status == "failed" and failed.category is None


def test_replayed_outcomes_change_nothing() -> None:
    ad = ref()
    done = merge(merge(None, success(ad, 0), now=101.0), success(ad, 1), now=102.0)
    assert done is not None
    assert merge(done, success(ad, 1), now=150.0) is None
    assert merge(done, AdAccepted(ad=ad), now=150.0) is None


def test_category_is_the_mean_over_classified_images() -> None:
    ad = ref(images=3)
    result = None
    for outcome in (success(ad, 0, "animals"), success(ad, 1, "animals"), success(ad, 2)):
        result = merge(result, outcome, now=101.0)
    assert result is not None and result.category == "animals"
    assert result.category_scores["animals"] == 0.6


def test_the_ad_carries_the_flags_its_images_tasks_set() -> None:
    ad = ref(images=3)
    outputs: list[dict[str, Any]] = [
        {"moderation": {"task": "moderation", "version": "1", "nsfw_score": 0.1, "flags": []}},
        {
            "moderation": {
                "task": "moderation",
                "version": "1",
                "nsfw_score": 0.9,
                "flags": ["nsfw"],
            },
            "mine": {"task": "mine", "version": "2", "flags": ["blurry", "nsfw"]},
        },
        {
            "moderation": {
                "task": "moderation",
                "version": "1",
                "error": {"reason": "task_error", "message": "x"},
            }
        },
    ]
    result = None
    for index, output in enumerate(outputs):
        outcome = success(ad, index)
        outcome.outputs = output
        result = merge(result, outcome, now=101.0)
        if index == 0:
            assert result is not None and result.flags == []
    assert result is not None and result.status == "done"
    assert result.flags == ["blurry", "nsfw"]
    assert result.images[1].outputs["mine"]["flags"] == ["blurry", "nsfw"]


def test_an_edit_replaces_the_result_and_late_outcomes_of_the_old_version_are_dropped() -> None:
    old, new = ref("old", version=100.0), ref("new", version=200.0, images=1)
    first = merge(None, success(old, 0), now=101.0)
    edited = merge(first, AdAccepted(ad=new), now=201.0)
    assert edited is not None and edited.request_id == "new" and edited.status == "pending"
    assert merge(edited, success(old, 1), now=202.0) is None
    done = merge(edited, success(new, 0), now=203.0)
    assert done is not None and done.status == "done" and done.image_count == 1


def fold(messages: list[AdAccepted | ImageOutcome]) -> AdResult | None:
    result = None
    for number, message in enumerate(messages):
        result = merge(result, message, now=200.0 + number) or result
    return result


def test_a_replay_that_fails_where_the_first_attempt_succeeded_keeps_the_success() -> None:
    ad = ref(images=1)
    done = fold([AdAccepted(ad=ad), success(ad, 0)])
    assert done is not None and done.status == "done"
    # The same request again (a replay after a crash); this time the image server fails.
    assert merge(done, failure(ad, 0), now=300.0) is None


def test_two_versions_of_one_time_are_ordered_by_arrival_not_by_hash() -> None:
    first = ref("zzz-first", version=100.0, images=1)
    second = AdRef(**{**first.asdict(), "request_id": "aaa-second", "submitted_at": 105.0})
    result = fold([AdAccepted(ad=first), AdAccepted(ad=second), success(first, 0)])
    assert result is not None and result.request_id == "aaa-second"  # the later one holds
    assert fold([AdAccepted(ad=second), AdAccepted(ad=first)]).request_id == "aaa-second"  # type: ignore[union-attr]


outcome_kinds = st.sampled_from(["success", "failure"])


@settings(max_examples=200)
@given(
    st.lists(outcome_kinds, min_size=1, max_size=4),
    st.lists(outcome_kinds, min_size=1, max_size=4),
    st.randoms(use_true_random=False),
    st.integers(0, 3),
)
def test_any_order_and_any_replays_end_in_the_newest_requests_result(
    old_kinds: list[str], new_kinds: list[str], rng: random.Random, replays: int
) -> None:
    old = ref("r-old", version=100.0, images=len(old_kinds))
    new = ref("r-new", version=200.0, images=len(new_kinds))

    def outcomes(ad: AdRef, kinds: list[str]) -> list[AdAccepted | ImageOutcome]:
        made = [
            success(ad, i) if kind == "success" else failure(ad, i) for i, kind in enumerate(kinds)
        ]
        return [AdAccepted(ad=ad), *made]

    messages = outcomes(old, old_kinds) + outcomes(new, new_kinds)
    messages += [rng.choice(messages) for _ in range(replays)]  # at-least-once: duplicates
    rng.shuffle(messages)
    result = fold(messages)
    assert result is not None and result.request_id == "r-new"
    assert result.status != "pending"
    assert [image.status for image in result.images] == [
        "done" if kind == "success" else "failed" for kind in new_kinds
    ]
    expected = (
        "done"
        if "failure" not in new_kinds
        else "failed"
        if "success" not in new_kinds
        else "partial"
    )
    assert result.status == expected
