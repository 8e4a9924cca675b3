"""The Python SDK of classify-app: submit ads, read their results. No torch, no Faust.

    pip install classify-app            # the SDK alone (aiohttp)
    pip install "classify-app[kafka]"   # and submitting straight to Kafka (aiokafka)

    from classify_app.sdk import ClassifyClient

    with ClassifyClient("http://127.0.0.1:6066") as client:
        client.submit({"ad_id": "42", "catalog_name": "cars", "images": [url]})
        result = client.wait("42", timeout=10)
        print(result.status, result.category, result.images[0].labels[0].name)

Everything is in `classify_app.sdk.client`; the names below are its public ones.
"""

from classify_app.sdk.client import (
    Acceptance,
    AsyncClassifyClient,
    ClassificationResult,
    ClassifyClient,
    ClassifyError,
    ClassifyTimeout,
    ClassifyUnavailable,
    ImageClassification,
    ImageFailure,
    SimilarAd,
)
from classify_app.vocabulary import FINAL_STATUSES, Label, Status

__all__ = [
    "FINAL_STATUSES",
    "Acceptance",
    "AsyncClassifyClient",
    "ClassificationResult",
    "ClassifyClient",
    "ClassifyError",
    "ClassifyTimeout",
    "ClassifyUnavailable",
    "ImageClassification",
    "ImageFailure",
    "Label",
    "SimilarAd",
    "Status",
]
