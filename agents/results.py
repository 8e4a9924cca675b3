"""Stage 3: image outcomes -> the results table, the `results` topic and, with
`CLASSIFY_SIMILARITY`, the vectors topic (and each result's duplicates).

`ResultsRecorder` folds one message into its ad's result. It runs where the message is: an
outcome of an ad whose result lives in the partition of the event being handled, on this
worker, is folded by the download stage at once (`OutcomeRouter`, `CLASSIFY_LOCAL_OUTCOMES`:
the outcome never crosses the outcomes topic); every other outcome (an `ads` topic partitioned
unlike ours, a partition that moved) goes through the topic to `record_results`, one message
at a time. Either way each table write happens inside the event that caused it and goes to
that event's changelog partition, and a result is published on `results` when an image
outcome completes the ad, and again if a replayed outcome lands on a completed ad
(at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from faust.streams import current_event
from faust.types import TP

from agents.sinks import NotDelivered, Sink, deliver
from classify_app.application import app
from classify_app.metrics import Metrics
from classify_app.records import AdAccepted, AdResult, AdVectors, ImageOutcome
from classify_app.topics import image_outcomes_topic, image_vectors_topic, results_topic
from tables.merge import is_final, merge
from tables.results import results_table
from tables.similarity import IndexFeeder, SimilarityIndex

log = logging.getLogger(__name__)


class ResultsRecorder:
    """Folds `AdAccepted` and `ImageOutcome` messages into the results table and publishes
    each result an outcome completes. Every table write is synchronous with the read it
    follows, so messages of one ad folded concurrently never lose each other's update."""

    def __init__(
        self,
        table: Any,
        *,
        results: Sink,
        vectors: Sink | None,
        index: SimilarityIndex | None,
        feeder: IndexFeeder | None,
        threshold: float,
        metrics: Metrics,
    ) -> None:
        self.table = table
        self.results = results
        self.vectors = vectors
        self.index = index
        self.feeder = feeder
        self.threshold = threshold
        self.metrics = metrics

    async def record(self, message: AdAccepted | ImageOutcome) -> None:
        """Fold `message` into its ad's result; publish the result if the message completes it
        (or replays an outcome of a completed ad)."""
        ad_id = message.ad.ad_id
        current, updated, now = self._merged(message)
        while updated is not None and self._waits_for_index(updated):
            # After a start, duplicates wait until the index holds every earlier ad; the
            # result may have changed meanwhile, so it is read again.
            await cast(IndexFeeder, self.feeder).caught_up.wait()
            current, updated, now = self._merged(message)
        if updated is not None:
            if self.index is not None and is_final(updated):
                updated = _with_duplicates(updated, self.index, self.threshold, self.metrics)
            self.table[ad_id] = updated
            if is_final(updated) and (
                current is None or current.request_id != updated.request_id or not is_final(current)
            ):
                self.metrics.ad_finished(updated, now)
        result = updated or current
        if (
            isinstance(message, ImageOutcome)
            and result is not None
            and result.request_id == message.ad.request_id
            and is_final(result)
        ):
            await _publish(self.results, ad_id, result)
            if self.vectors is not None and self.index is not None:
                vectors = AdVectors.of(result, self.index.first_posted(ad_id))
                try:
                    self.index.put(vectors)  # this worker's next ads see it before the topic does
                except Exception:
                    log.exception("Indexing the vectors of ad %s failed", ad_id)
                await _publish(self.vectors, ad_id, vectors)

    def _merged(
        self, message: AdAccepted | ImageOutcome
    ) -> tuple[AdResult | None, AdResult | None, float]:
        """The ad's result now, the result after `message` (None: unchanged), and when."""
        current = self.table.get(message.ad.ad_id)
        now = time.time()
        return current, merge(current, message, now=now), now

    def _waits_for_index(self, updated: AdResult) -> bool:
        return (
            self.index is not None
            and self.feeder is not None
            and is_final(updated)
            and not self.feeder.caught_up.is_set()
        )


class OutcomeRouter:
    """The download stage's outcomes sink: a message whose ad's result lives in the partition
    of the event being handled, and which this worker holds, is folded into the table at once
    (`send` returns once its result is published); any other goes on the outcomes topic.

    The ad's key decides its result's partition (the producer's partitioner, as lookups route
    it), the event's partition decides where the table write goes: the two agree when the
    marketplace partitions `ads` as we do (murmur2 of the key, like the Java client and
    librdkafka's `murmur2_random`) with as many partitions.
    """

    def __init__(
        self, recorder: ResultsRecorder, topic: Sink, *, changelog: str, fold_here: bool = True
    ) -> None:
        self.recorder = recorder
        self.fold_here = fold_here
        self.topic = topic
        self.changelog = changelog
        self._learnt = False

    async def send(self, *, key: Any = None, value: Any = None) -> Any:
        event = current_event()
        if (
            self.fold_here
            and event is not None
            and isinstance(key, str)
            and await self._holds(key, event)
        ):
            await self.recorder.record(value)
            self.recorder.metrics.outcome_routed("local")
            return None
        pending = await self.topic.send(key=key, value=value)
        self.recorder.metrics.outcome_routed("topic")
        return pending

    async def _holds(self, key: str, event: Any) -> bool:
        """Whether the ad's result lives here, in the event's partition. Between this answer
        and the table write nothing awaits but a similarity index catching up, and a
        rebalance cancels the handler before the partition moves (`InOrderAcks.give_back`)."""
        if not self._learnt:
            await app.partition_metadata(self.changelog)  # else the partitioner cannot say
            self._learnt = True
        partition = event.message.partition
        if not app.assignor.is_active(TP(self.changelog, partition)):
            return False
        producer: Any = app.producer
        try:
            owner = producer.key_partition(self.changelog, key.encode()).partition
        except Exception:  # the changelog's partitions not known yet: the topic path is safe
            return False
        return bool(owner == partition)


def recorder() -> ResultsRecorder:
    """The worker's results recorder."""
    return ResultsRecorder(
        results_table,
        results=results_topic,
        vectors=image_vectors_topic,
        index=app.parts.similarity,
        feeder=app.parts.index_feeder,
        threshold=app.settings.duplicate_threshold,
        metrics=app.parts.metrics,
    )


def outcomes_sink() -> OutcomeRouter:
    """Where the download stage sends outcomes: folded where they are when
    `CLASSIFY_LOCAL_OUTCOMES` allows, else the outcomes topic."""
    return OutcomeRouter(
        recorder(),
        image_outcomes_topic,
        changelog=results_table.changelog_topic.get_topic_name(),
        fold_here=app.settings.local_outcomes,
    )


@app.agent(image_outcomes_topic)
async def record_results(stream: Any) -> None:
    """Fold each outcome that crossed the topic into the ad's result, one at a time."""
    results = recorder()
    async for message in stream:
        if not isinstance(message, AdAccepted | ImageOutcome):
            log.warning("Ignored an unexpected message on %s: %r", image_outcomes_topic, message)
            continue
        await results.record(message)


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


async def _publish(topic: Sink, ad_id: str, value: AdResult | AdVectors) -> None:
    """Publish, trying again until the broker has it: waiting here holds the next messages
    on Kafka (backpressure), and the message is not acknowledged before its result is
    delivered."""
    delay = 0.1
    while True:
        try:
            await deliver(topic, key=ad_id, value=value)
            return
        except NotDelivered as exc:
            log.warning("Publishing to %s for ad %s failed, retrying: %s", topic, ad_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
