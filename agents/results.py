"""Stage 3: image outcomes -> the results table, the `results` topic and, with
`CLASSIFY_SIMILARITY`, the vectors topic (and each result's duplicates).

One message at a time, so every table write happens inside the event that caused it and goes
to that event's changelog partition. A result is published on `results` when an image outcome
completes the ad, and again if a replayed outcome lands on a completed ad (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from faust.types import TopicT

from agents.sinks import NotDelivered, deliver
from classify_app.application import app
from classify_app.metrics import Metrics
from classify_app.records import AdAccepted, AdResult, AdVectors, ImageOutcome
from classify_app.topics import image_outcomes_topic, image_vectors_topic, results_topic
from tables.merge import is_final, merge
from tables.results import results_table
from tables.similarity import SimilarityIndex

log = logging.getLogger(__name__)


@app.agent(image_outcomes_topic)
async def record_results(stream: Any) -> None:
    """Fold each outcome into the ad's result."""
    metrics = app.parts.metrics
    index, feeder = app.parts.similarity, app.parts.index_feeder
    threshold = app.settings.duplicate_threshold
    async for message in stream:
        if not isinstance(message, AdAccepted | ImageOutcome):
            log.warning("Ignored an unexpected message on %s: %r", image_outcomes_topic, message)
            continue
        ad_id = message.ad.ad_id
        current = results_table.get(ad_id)
        now = time.time()
        updated = merge(current, message, now=now)
        if updated is not None:
            if index is not None and is_final(updated):
                if feeder is not None and not feeder.caught_up.is_set():
                    # After a start, duplicates wait until the index holds every earlier ad.
                    await feeder.caught_up.wait()
                updated = _with_duplicates(updated, index, threshold, metrics)
            results_table[ad_id] = updated
            if is_final(updated) and (
                current is None or current.request_id != updated.request_id or not is_final(current)
            ):
                metrics.ad_finished(updated, now)
        result = updated or current
        if (
            isinstance(message, ImageOutcome)
            and result is not None
            and result.request_id == message.ad.request_id
            and is_final(result)
        ):
            await _publish(results_topic, ad_id, result)
            if image_vectors_topic is not None and index is not None:
                vectors = AdVectors.of(result, index.first_posted(ad_id))
                try:
                    index.put(vectors)  # this worker's next ads see it before the topic does
                except Exception:
                    log.exception("Indexing the vectors of ad %s failed", ad_id)
                await _publish(image_vectors_topic, ad_id, vectors)


def _with_duplicates(
    result: AdResult, index: SimilarityIndex, threshold: float, metrics: Metrics
) -> AdResult:
    """The result with the images of earlier ads its images nearly repeat (once: a replay
    keeps what was found when the ad became final)."""
    if result.duplicates:
        return result
    try:
        duplicates = index.duplicates(
            AdVectors.of(result, index.first_posted(result.ad_id)), threshold
        )
    except Exception:
        # The result matters more than its duplicates: it goes on without them.
        log.exception("Looking for duplicates of ad %s failed", result.ad_id)
        return result
    if not duplicates:
        return result
    metrics.duplicates.inc()
    return result.derive(duplicates=duplicates)


async def _publish(topic: TopicT, ad_id: str, value: AdResult | AdVectors) -> None:
    """Publish on `results`, trying again until the broker has it: this stage takes one
    message at a time, so waiting here holds the next ones on Kafka (backpressure), and the
    outcome is not acknowledged before its result is delivered."""
    delay = 0.1
    while True:
        try:
            await deliver(topic, key=ad_id, value=value)
            return
        except NotDelivered as exc:
            log.warning("Publishing to %s for ad %s failed, retrying: %s", topic, ad_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
