"""The topics of the pipeline. Every topic is keyed by ad id, so one ad stays on one partition
from the first stage to the results table.

All topics are declared here with the configured partition count; the worker creates the ones
that do not exist yet (existing topics are left as they are).
"""

from __future__ import annotations

from typing import Any

from faust.types import TopicT

from classify_app.application import app
from classify_app.records import AdResult, DeadLetter, ImageRetry
from classify_app.worker import APP_ID


def _topic(name: str, **options: Any) -> TopicT:
    topic = app.topic(
        name,
        partitions=app.settings.partitions,
        replicas=app.settings.replication_factor,
        internal=True,
        **options,
    )
    app.declared_topics.append(topic)
    return topic


# Raw bytes: the download stage validates the JSON itself, so a malformed event becomes a
# dead letter with a reason instead of a decoding error inside Faust.
ads_topic = _topic(app.settings.ads_topic, value_serializer="raw")
# Images to download again after a transient failure; each waits there until it is due.
download_retries_topic = _topic(f"{APP_ID}-download-retries", value_type=ImageRetry)
# Carries `AdAccepted` and `ImageOutcome` records; Faust rebuilds each from its metadata.
image_outcomes_topic = _topic(f"{APP_ID}-image-outcomes")
results_topic = _topic(app.settings.results_topic, value_type=AdResult)
dead_letter_topic = _topic(app.settings.dead_letter_topic, value_type=DeadLetter)
