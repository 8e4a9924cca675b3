"""Stage 3: image outcomes -> the results table and the `results` topic.

One message at a time, so every table write happens inside the event that caused it and goes
to that event's changelog partition. A result is published on `results` when an image outcome
completes the ad, and again if a replayed outcome lands on a completed ad (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agents.sinks import NotDelivered, deliver
from classify_app.application import app
from classify_app.records import AdAccepted, AdResult, ImageOutcome
from classify_app.topics import image_outcomes_topic, results_topic
from tables.merge import is_final, merge
from tables.results import results_table

log = logging.getLogger(__name__)


@app.agent(image_outcomes_topic)
async def record_results(stream: Any) -> None:
    """Fold each outcome into the ad's result."""
    metrics = app.parts.metrics
    async for message in stream:
        if not isinstance(message, AdAccepted | ImageOutcome):
            log.warning("Ignored an unexpected message on %s: %r", image_outcomes_topic, message)
            continue
        ad_id = message.ad.ad_id
        current = results_table.get(ad_id)
        now = time.time()
        updated = merge(current, message, now=now)
        if updated is not None:
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
            await _publish(ad_id, result)


async def _publish(ad_id: str, result: AdResult) -> None:
    """Publish on `results`, trying again until the broker has it: this stage takes one
    message at a time, so waiting here holds the next ones on Kafka (backpressure), and the
    outcome is not acknowledged before its result is delivered."""
    delay = 0.1
    while True:
        try:
            await deliver(results_topic, key=ad_id, value=result)
            return
        except NotDelivered as exc:
            log.warning("Publishing the result of ad %s failed, retrying: %s", ad_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
