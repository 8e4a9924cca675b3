"""The results stage's fold, in-process: concurrent messages of one ad (as the download stage
folds them) lose nothing, a result waiting for the similarity index reads the table again, and
the outcome router sends to the topic what it cannot fold where it is."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from agents.results import OutcomeRouter, ResultsRecorder
from classify_app.metrics import Metrics
from classify_app.records import AdAccepted
from tables.similarity import SimilarityIndex
from tests.support.records import RecordingSink, ad_ref, image_success


def recorder(table: dict[str, Any], results: RecordingSink, **options: Any) -> ResultsRecorder:
    defaults: dict[str, Any] = {"vectors": None, "index": None, "feeder": None, "threshold": 0.9}
    return ResultsRecorder(table, results=results, metrics=Metrics(), **{**defaults, **options})


async def test_images_of_one_ad_folded_at_once_all_count_and_publish_once() -> None:
    table: dict[str, Any] = {}
    results = RecordingSink()
    ad = ad_ref("r1", 100.0, images=3)
    folding = recorder(table, results)
    await asyncio.gather(*(folding.record(image_success(ad, index)) for index in (2, 0, 1)))
    assert table["ad-1"].status == "done"
    assert [image.index for image in table["ad-1"].images] == [0, 1, 2]
    assert [value.request_id for value in results.values] == ["r1"]
    # A replay changes nothing and publishes the completed result again (at-least-once).
    await folding.record(image_success(ad, 1))
    assert len(results.values) == 2 and results.values[1] == table["ad-1"]


async def test_a_result_waiting_for_the_index_never_overwrites_what_changed_meanwhile() -> None:
    table: dict[str, Any] = {}
    results, vectors = RecordingSink(), RecordingSink()
    feeder = SimpleNamespace(caught_up=asyncio.Event())
    folding = recorder(
        table, results, vectors=vectors, index=SimilarityIndex(4), feeder=cast(Any, feeder)
    )
    older, newer = ad_ref("r1", 100.0, images=1), ad_ref("r2", 200.0, images=1)
    waiting = asyncio.ensure_future(folding.record(image_success(older, 0)))
    await asyncio.sleep(0.05)
    assert not waiting.done() and "ad-1" not in table  # final: it waits for the index
    # Meanwhile the ad is edited, and the edit announced (pending: it waits for nothing).
    await folding.record(AdAccepted(ad=newer))
    feeder.caught_up.set()
    await waiting
    assert table["ad-1"].request_id == "r2" and table["ad-1"].status == "pending"
    assert results.values == []
    await folding.record(image_success(newer, 0))
    assert [value.request_id for value in results.values] == ["r2"]
    assert [value.request_id for value in vectors.values] == ["r2"]


async def test_the_router_sends_to_the_topic_what_it_does_not_fold() -> None:
    table: dict[str, Any] = {}
    results, topic = RecordingSink(), RecordingSink()
    folding = recorder(table, results)
    ad = ad_ref("r1", 100.0, images=1)
    # Outside any event (no partition to fold into), and with folding turned off.
    for router in (
        OutcomeRouter(folding, topic, changelog="changelog"),
        OutcomeRouter(folding, topic, changelog="changelog", fold_here=False),
    ):
        await router.send(key="ad-1", value=image_success(ad, 0))
    assert [key for key, _ in topic.records] == ["ad-1", "ad-1"]
    assert table == {} and results.values == []
