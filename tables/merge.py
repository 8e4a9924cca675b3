"""How an ad's result changes with each message: the whole update rule of the results table.

`merge` is pure (no app, no Kafka) so that it can be tested and reasoned about on its own:
replays of a message change nothing, an older request never overwrites a newer one, and an ad
is complete when every one of its images has an outcome.
"""

from __future__ import annotations

from classify_app.records import (
    AdAccepted,
    AdRef,
    AdResult,
    AdVectors,
    ImageOutcome,
    ImageResult,
)
from classify_app.vocabulary import Status


def pending_result(ad: AdRef) -> AdResult:
    """The result of an ad that was accepted and has no image outcome yet."""
    return AdResult(
        ad_id=ad.ad_id,
        request_id=ad.request_id,
        catalog_name=ad.catalog_name,
        catalog_ad_id=ad.catalog_ad_id,
        status=Status.PENDING,
        image_count=ad.image_count,
        version=ad.version,
        submitted_at=ad.submitted_at,
        accepted_at=ad.accepted_at,
    )


def merge(
    current: AdResult | None, message: AdAccepted | ImageOutcome, now: float
) -> AdResult | None:
    """The new result after `message`, or None when the message changes nothing."""
    ad = message.ad
    if current is not None and current.request_id != ad.request_id:
        if request_order(ad) < request_order(current):
            return None  # an older request for an ad that was edited since
        current = None
    if isinstance(message, AdAccepted):
        return pending_result(ad) if current is None else None
    base = current or pending_result(ad)
    images = {image.index: image for image in base.images}
    image = _image_result(message)
    held = images.get(message.index)
    if held == image or (held is not None and held.status == Status.DONE and image.error):
        return None  # a replay; one that failed where the first attempt succeeded keeps that
    images[message.index] = image
    return _summarise(base, [images[index] for index in sorted(images)], message, now)


def request_order(request: AdRef | AdResult | AdVectors) -> tuple[float, float, str]:
    """How the requests for one ad are ordered: by version (`updated_at`, else when the event
    was produced), then by when it was produced (arrival), then by request id; a version or
    time before the epoch counts as the epoch. The store orders them the same way."""
    return (max(request.version, 0.0), max(request.submitted_at, 0.0), request.request_id)


def is_final(result: AdResult) -> bool:
    """True once every image of the ad has an outcome."""
    return result.status != Status.PENDING


def _image_result(outcome: ImageOutcome) -> ImageResult:
    return ImageResult(
        index=outcome.index,
        url=outcome.url,
        status=Status.FAILED if outcome.error is not None else Status.DONE,
        labels=outcome.labels,
        category=outcome.category,
        category_scores=outcome.category_scores,
        error=outcome.error,
        timings=outcome.timings,
        outputs=outcome.outputs,
    )


def _summarise(
    base: AdResult, images: list[ImageResult], outcome: ImageOutcome, now: float
) -> AdResult:
    classified = [image for image in images if image.status == Status.DONE]
    if len(images) < base.image_count:
        status = Status.PENDING
    elif len(classified) == len(images):
        status = Status.DONE
    else:
        status = Status.PARTIAL if classified else Status.FAILED
    scores = _mean_category_scores(images)
    completed_at = base.completed_at
    if status != Status.PENDING and completed_at is None:
        completed_at = now
    return base.derive(
        status=status,
        images=images,
        category=max(scores, key=scores.__getitem__) if scores else None,
        category_scores=scores,
        model=outcome.model or base.model,
        model_version=outcome.model_version or base.model_version,
        completed_at=completed_at,
        flags=sorted(
            {
                flag
                for image in images
                for output in image.outputs.values()
                if isinstance(output, dict)
                for flag in output.get("flags", [])
            }
        ),
        latency_seconds=None
        if completed_at is None
        else round(completed_at - base.submitted_at, 6),
    )


def _mean_category_scores(images: list[ImageResult]) -> dict[str, float]:
    """The ad's category scores: the mean over its classified images."""
    classified = [image.category_scores for image in images if image.status == Status.DONE]
    if not classified:
        return {}
    return {
        name: round(sum(scores.get(name, 0.0) for scores in classified) / len(classified), 5)
        for name in classified[0]
    }
