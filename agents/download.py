"""Stage 1: `ads` -> image outcomes. Validates each ad event and sends one `ImageOutcome` per
image (`agents/images.py` says what became of it) to the outcome router, which folds it into
the results table at once where this worker holds the ad's result, else puts it on the
outcomes topic (`agents/results.py`); an ad whose images take longer than
`CLASSIFY_ANNOUNCE_AFTER_S` is announced first (`AdAccepted`: its result is pending).

An image whose download failed transiently waits on the download-retries topic and comes back
through `retry_downloads` when it is due; the main stage never waits for it. An ad's event is
acknowledged once each of its images has its outcome (or its retry) sent, so a crash replays the
ad and loses nothing. A malformed event goes to the dead-letter topic. Nothing here raises out
of the agent: the worker keeps going whatever the input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from faust.types import EventT, StreamT

from agents.acks import InOrderAcks, LeaveUnacknowledged
from agents.images import ImageProcessor
from agents.results import outcomes_sink
from agents.sinks import DeadLetters, Sink, deliver
from classify_app.application import app
from classify_app.metrics import Metrics
from classify_app.records import (
    AdAccepted,
    AdEvent,
    AdRef,
    EventShape,
    ImageRetry,
    InvalidEvent,
    parse_ad_event,
)
from classify_app.topics import (
    ads_topic,
    dead_letter_topic,
    download_retries_topic,
)
from classify_app.vocabulary import EventReason

log = logging.getLogger(__name__)

UNKNOWN_FIELDS_LOG_SECONDS = 60.0


class DownloadStage:
    """Ad events in, `AdAccepted` and one `ImageOutcome` per image out.

    Up to `concurrency` ads are handled at once and acknowledged in offset order
    (`InOrderAcks`); offsets are committed only past ads whose images all have their outcome
    (or retry) sent, so a crash mid-download replays the ad (the results stage absorbs the
    duplicates).
    """

    def __init__(
        self,
        images: ImageProcessor,
        *,
        outcomes: Sink,
        retries: Sink,
        dead_letters: DeadLetters,
        metrics: Metrics,
        max_images: int,
        max_event_bytes: int,
        concurrency: int,
        announce_after: float = 0.0,
        shape: EventShape | None = None,
        strict: bool = False,
        release: Callable[[Any], None] | None = None,
        before_drain: list[Callable[[], Awaitable[object]]] | None = None,
    ) -> None:
        """`release` hands an event back unacknowledged; `before_drain` is where the stage
        registers, while it consumes, what to do before a rebalance or a stop waits for the
        streams (`ClassifyApp.before_streams_drain`): give its work in flight back."""
        self.images = images
        self.outcomes = outcomes
        self.retries = retries
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.max_images = max_images
        self.max_event_bytes = max_event_bytes
        self.shape = shape
        self.strict = strict
        self._unknown_logged_at = -UNKNOWN_FIELDS_LOG_SECONDS
        self.concurrency = concurrency
        self.announce_after = announce_after
        self.release = release
        self.before_drain = before_drain if before_drain is not None else []

    async def consume_ads(self, stream: StreamT) -> None:
        """Handle every ad event of `stream` (the `ads` topic)."""
        await self._consume(stream, self.handle_ad_event)

    async def consume_retries(self, stream: StreamT) -> None:
        """Try each image of `stream` (the retries topic) again once it is due.

        Each waits in its own slot until it is due; they are acknowledged in offset order.
        """

        longest = self.images.longest_retry_delay()

        async def retry(event: EventT) -> None:
            image = cast(ImageRetry, event.value)
            # A due time further away than any retry is scheduled (clock skew, a foreign
            # record) waits no longer than the longest retry delay.
            wait = min(image.due_at - time.time(), longest)
            if wait > 0:
                await asyncio.sleep(wait)
            await self.process_image(image.ad, image.index, image.url, image.attempt)

        await self._consume(stream, retry)

    async def _consume(
        self, stream: StreamT, handler: Callable[[EventT], Coroutine[Any, Any, None]]
    ) -> None:
        unacked: Any = stream.noack()  # type: ignore[attr-defined]
        acks = InOrderAcks(unacked, limit=self.concurrency, release=self._released)

        async def give_back() -> None:
            self.images.abandon_waiting()
            given = await acks.give_back()
            if given:
                log.info("Handed back %d events in flight, to be processed again", given)

        self.before_drain.append(give_back)
        try:
            async for event in unacked.events():
                await acks.submit(event, handler(event))
        finally:
            self.before_drain.remove(give_back)
            self.images.abandon_waiting()  # stopping: what has not started is done again later
            await acks.drain()

    def _unknown_fields(self, names: list[str]) -> None:
        """Counted always, named in the log at most once a minute: their values are not ours
        to log, and a marketplace's events may all carry the same dozen extra fields."""
        self.metrics.unknown_fields(len(names))
        now = time.monotonic()
        if now - self._unknown_logged_at >= UNKNOWN_FIELDS_LOG_SECONDS:
            self._unknown_logged_at = now
            shown = ", ".join(repr(name[:64]) for name in sorted(names)[:10])
            log.info(
                "Ad events carry fields that are ignored: %s%s (CLASSIFY_EVENT_FIELDS maps "
                "a marketplace's fields to ours; CLASSIFY_STRICT_EVENTS refuses unknown ones)",
                shown,
                ", ..." if len(names) > 10 else "",
            )

    def _released(self, event: EventT) -> None:
        if self.release is not None:
            self.release(event.message)

    async def handle_ad_event(self, event: EventT) -> None:
        """Validate one raw event and process its ad; anything unprocessable is dead-lettered."""
        try:
            ad = parse_ad_event(
                event.value,
                max_images=self.max_images,
                max_bytes=self.max_event_bytes,
                shape=self.shape,
                strict=self.strict,
                on_unknown=self._unknown_fields,
            )
        except InvalidEvent as exc:
            await self.dead_letters.send(event, exc.reason, exc.message)
            return
        try:
            await self.process_ad(ad, produced_at=event.message.timestamp)
        except LeaveUnacknowledged:
            raise  # processed again later; see `InOrderAcks`
        except Exception as exc:
            log.exception(
                "Processing ad %s failed", ad.ad_id, extra={"ad_id": ad.ad_id, "stage": "download"}
            )
            await self.dead_letters.send(event, EventReason.INTERNAL_ERROR, repr(exc))

    async def process_ad(self, ad: AdEvent, *, produced_at: float) -> None:
        """Process the ad's images concurrently, announcing the ad as pending if they are slow
        (`_announce_unless`)."""
        ref = AdRef(
            ad_id=ad.ad_id,
            request_id=ad.request_id(),
            catalog_name=ad.catalog_name,
            catalog_ad_id=ad.catalog_ad_id,
            image_count=len(ad.images),
            version=ad.updated_at or produced_at,
            submitted_at=produced_at,
            accepted_at=time.time(),
            title=ad.title,
            price=ad.price,
        )
        outcome_sent = asyncio.Event()
        announcing = asyncio.ensure_future(self._announce_unless(outcome_sent, ref))
        try:
            # Every image finishes before the ad's handler does: its slot bounds the images held.
            done = await asyncio.gather(
                *(
                    self.process_image(ref, index, url, sent=outcome_sent)
                    for index, url in enumerate(ad.images)
                ),
                return_exceptions=True,
            )
        except BaseException:
            announcing.cancel()
            raise
        if not outcome_sent.is_set() and not announcing.done():
            # Every image waits for a retry: the ad is pending from now on. (Announcing twice,
            # should the timer have just fired, is harmless: the second changes nothing.)
            announcing.cancel()
            await deliver(self.outcomes, key=ad.ad_id, value=AdAccepted(ad=ref))
        else:
            await announcing  # raises if the announcement was not delivered
        for result in done:
            if isinstance(result, BaseException):
                raise result

    async def _announce_unless(self, outcome_sent: asyncio.Event, ad: AdRef) -> None:
        """Announce the ad (`AdAccepted`: its result is pending) unless an outcome of its
        images is sent within `announce_after` seconds: that outcome creates the result, and
        a quick ad costs one message and one table write fewer."""
        try:
            async with asyncio.timeout(self.announce_after):
                await outcome_sent.wait()
        except TimeoutError:
            await deliver(self.outcomes, key=ad.ad_id, value=AdAccepted(ad=ad))

    async def process_image(
        self,
        ad: AdRef,
        index: int,
        url: str,
        attempt: int = 1,
        *,
        sent: asyncio.Event | None = None,
    ) -> None:
        """Send the image's outcome (then set `sent`), or hand it to the retry stage."""
        result = await self.images.process(ad, index, url, attempt)
        # A record the broker does not take leaves the ad unacknowledged (`NotDelivered`): it
        # is processed again rather than recorded as failed.
        if isinstance(result, ImageRetry):
            await deliver(self.retries, key=ad.ad_id, value=result)
            self.metrics.download_retried(result.reason)
        else:
            await deliver(self.outcomes, key=ad.ad_id, value=result)
            if sent is not None:
                sent.set()


def _stage() -> DownloadStage:
    parts = app.parts
    return DownloadStage(
        parts.images,
        outcomes=outcomes_sink(),
        retries=download_retries_topic,
        dead_letters=DeadLetters(dead_letter_topic, parts.metrics, stage="download"),
        metrics=parts.metrics,
        max_images=app.settings.max_images_per_ad,
        max_event_bytes=app.settings.max_event_bytes,
        concurrency=app.settings.download_concurrency,
        announce_after=app.settings.announce_after_s,
        shape=EventShape(app.settings.event_fields),
        strict=app.settings.strict_events,
        release=cast(Any, app.consumer).release,
        before_drain=app.before_streams_drain,
    )


@app.agent(ads_topic)
async def download_images(stream: StreamT) -> None:
    """`ads` -> `AdAccepted` + image outcomes (dead letters for malformed events)."""
    await _stage().consume_ads(stream)


@app.agent(download_retries_topic)
async def retry_downloads(stream: StreamT) -> None:
    """Download-retries -> image outcomes (or the next retry)."""
    await _stage().consume_retries(stream)
