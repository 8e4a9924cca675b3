"""The topics of the pipeline. Every topic is keyed by ad id, so one ad stays on one partition
from the first stage to the results table.

All topics are declared here with the configured partition count; the worker creates the ones
that do not exist yet (existing topics are left as they are).
"""

from __future__ import annotations

from typing import Any

from faust.types import TopicT

from classify_app.application import app
from classify_app.records import AdResult, AdVectors, DeadLetter, ImageRetry


def _topic(name: str, *, created: bool = True, **options: Any) -> TopicT:
    topic = app.topic(
        name,
        partitions=app.settings.partitions,
        replicas=app.settings.topic_replicas,
        internal=created,
        **options,
    )
    if created:
        app.declared_topics.append(topic)
    return topic


# Raw bytes: the download stage validates the JSON itself, so a malformed event becomes a
# dead letter with a reason instead of a decoding error inside Faust.
# The ad service's topic: created here only when asked (`CLASSIFY_CREATE_INPUT_TOPIC`).
ads_topic = _topic(
    app.settings.ads_topic, created=app.settings.creates_input_topic, value_serializer="raw"
)
# Images to download again after a transient failure; each waits there until it is due.
download_retries_topic = _topic(f"{app.settings.app_id}-download-retries", value_type=ImageRetry)
# Carries `AdAccepted` and `ImageOutcome` records; Faust rebuilds each from its metadata.
image_outcomes_topic = _topic(f"{app.settings.app_id}-image-outcomes")
results_topic = _topic(app.settings.results_topic, value_type=AdResult)
dead_letter_topic = _topic(app.settings.dead_letter_topic, value_type=DeadLetter)
# The embeddings of every ad's classified images, the source of every worker's similarity
# index (`tables.similarity`): compacted, the newest record of an ad is all that counts.
image_vectors_topic = (
    _topic(
        app.settings.vectors_topic,
        value_type=AdVectors,
        config={"cleanup.policy": "compact"},
    )
    if app.settings.similarity
    else None
)
