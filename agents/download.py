"""Stage 1: `ads` -> image tasks. Validates each ad event, downloads its images and preprocesses
them for the model.

Every image leaves this stage exactly once: as an `ImageTask` (pixels ready for inference) or
as an `ImageOutcome` carrying the reason it failed. A malformed event goes to the dead-letter
topic. Nothing here raises out of the agent: the worker keeps going whatever the input.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import mode
import numpy as np
from faust.types import EventT
from yarl import URL

from agents.acks import InOrderAcks
from agents.dead_letters import dead_letter
from classify_app.app import app, metrics, runtime, settings
from classify_app.records import (
    AdAccepted,
    AdEvent,
    AdRef,
    ImageError,
    ImageOutcome,
    ImageTask,
    InvalidEvent,
    parse_ad_event,
)
from classify_app.settings import Settings
from classify_app.topics import (
    ads_topic,
    image_outcomes_topic,
    image_tasks_topic,
)
from models import ImageModel, ImageRejected, decode_image

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK_BYTES = 64 * 1024


class ImageDownloader:
    """Fetches image bytes with one shared HTTP session and hard limits.

    Limits: `download_connections` connections, a connect timeout and a total timeout per
    image, a byte limit checked while streaming, and a bounded number of redirects. Failures
    raise `ImageRejected` with a reason code.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.download_timeout_s, sock_connect=settings.download_connect_timeout_s
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.download_connections, ttl_dns_cache=300
                ),
                timeout=self._timeout,
                headers={"User-Agent": "classify-app/0.1 (+image classification)"},
                auto_decompress=True,
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        """Download one image's bytes, or raise `ImageRejected`."""
        target = _checked_url(url)
        try:
            return await self._fetch(target)
        except ImageRejected:
            raise
        except TimeoutError:
            raise ImageRejected(
                "timeout", f"no complete answer within {self.settings.download_timeout_s:g} s"
            ) from None
        except aiohttp.TooManyRedirects:
            raise ImageRejected(
                "too_many_redirects", f"more than {self.settings.download_max_redirects} redirects"
            ) from None
        except aiohttp.InvalidURL as exc:
            raise ImageRejected("invalid_url", f"invalid URL: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ImageRejected("connection_error", f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise ImageRejected("http_error", f"{type(exc).__name__}: {exc}") from None

    async def _fetch(self, url: URL) -> bytes:
        limit = self.settings.download_max_bytes
        async with self._get_session().get(
            url, max_redirects=self.settings.download_max_redirects
        ) as response:
            if response.status >= 400:
                raise ImageRejected(
                    f"http_{response.status}",
                    f"the image server answered {response.status} {response.reason or ''}".strip(),
                )
            if response.content_length is not None and response.content_length > limit:
                raise ImageRejected(
                    "too_large", f"{response.content_length} bytes announced, the limit is {limit}"
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise ImageRejected("too_large", f"more than {limit} bytes, the limit")
            return bytes(body)

    async def close(self) -> None:
        """Close the HTTP session and its connections."""
        if self._session is not None:
            await self._session.close()


def _checked_url(url: str) -> URL:
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise ImageRejected("invalid_url", f"invalid URL: {exc}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise ImageRejected(
            "invalid_url", f"only http(s) URLs with a host are fetched, not {url!r}"
        )
    return target


class ImagePreparer:
    """Decodes and preprocesses image bytes for a model, in a small thread pool."""

    def __init__(self, model: ImageModel, *, threads: int, max_pixels: int) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    async def prepare(self, data: bytes) -> np.ndarray:
        """Decode and preprocess off the event loop; raises `ImageRejected`."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._prepare_blocking, data
        )

    def _prepare_blocking(self, data: bytes) -> np.ndarray:
        image = decode_image(data, max_pixels=self.max_pixels, draft=self.model.draft_size)
        return self.model.preprocess(image)


downloader = ImageDownloader(settings)
# Bounds the images between request and decoded pixels across all actors, so the memory held
# by downloaded bytes is at most download_connections x download_max_bytes.
images_in_flight = asyncio.Semaphore(settings.download_connections)
preparer = ImagePreparer(
    runtime.model, threads=settings.decode_threads, max_pixels=settings.max_image_pixels
)


@app.service
class DownloaderLifecycle(mode.Service):
    """Closes the shared HTTP session when the worker stops."""

    async def on_stop(self) -> None:
        """Called by Faust at worker shutdown."""
        await downloader.close()


@app.agent(ads_topic)
async def download_images(stream: Any) -> None:
    """Handle up to `download_concurrency` ads at once, acking them in offset order.

    Offsets are committed only past ads whose images have all been handed on, so a crash
    mid-download replays the ad (the results stage absorbs the duplicates).
    """
    unacked = stream.noack()
    acks = InOrderAcks(unacked, limit=settings.download_concurrency)
    try:
        async for event in unacked.events():
            await acks.submit(event, handle_ad_event(event))
    finally:
        await acks.drain()


async def handle_ad_event(event: EventT) -> None:
    """Validate one raw event and process its ad; anything unprocessable is dead-lettered."""
    message = event.message
    try:
        ad = parse_ad_event(event.value, max_images=settings.max_images_per_ad)
    except InvalidEvent as exc:
        await dead_letter(event, exc.reason, exc.message)
        return
    try:
        await process_ad(ad, produced_at=message.timestamp)
    except Exception as exc:
        log.exception(
            "Processing ad %s failed", ad.ad_id, extra={"ad_id": ad.ad_id, "stage": "download"}
        )
        await dead_letter(event, "internal_error", repr(exc))


async def process_ad(ad: AdEvent, *, produced_at: float) -> None:
    """Announce the ad as pending, then download and prepare its images concurrently."""
    ref = AdRef(
        ad_id=ad.ad_id,
        request_id=ad.request_id(),
        catalog_name=ad.catalog_name,
        catalog_ad_id=ad.catalog_ad_id,
        image_count=len(ad.images),
        version=ad.updated_at or produced_at,
        submitted_at=produced_at,
        accepted_at=time.time(),
    )
    await image_outcomes_topic.send(key=ad.ad_id, value=AdAccepted(ad=ref))
    await asyncio.gather(*(process_image(ref, index, url) for index, url in enumerate(ad.images)))


async def process_image(ad: AdRef, index: int, url: str) -> None:
    """Download and preprocess one image; emit its task, or its failure."""
    started = time.perf_counter()
    download_seconds = 0.0
    try:
        async with images_in_flight:
            metrics.downloads_in_progress.inc()
            try:
                data = await downloader.fetch(url)
                download_seconds = time.perf_counter() - started
                metrics.image_downloaded(download_seconds, ok=True)
                pixels = await preparer.prepare(data)
                metrics.image_prepared(time.perf_counter() - started - download_seconds)
            finally:
                metrics.downloads_in_progress.dec()
    except ImageRejected as exc:
        if not download_seconds:
            metrics.image_downloaded(time.perf_counter() - started, ok=False)
        await _send_failure(ad, index, url, exc.reason, exc.message, started)
        return
    except Exception as exc:
        # A bug must cost one image its result, never the ad nor the worker.
        log.exception(
            "Unexpected error preparing image %d of ad %s",
            index,
            ad.ad_id,
            extra={"ad_id": ad.ad_id, "stage": "download"},
        )
        await _send_failure(ad, index, url, "internal_error", repr(exc), started)
        return
    height, width, _ = pixels.shape
    await image_tasks_topic.send(
        key=ad.ad_id,
        value=ImageTask(
            ad=ad,
            index=index,
            url=url,
            pixels=base64.b64encode(pixels.tobytes()).decode("ascii"),
            height=height,
            width=width,
            download_seconds=round(download_seconds, 6),
            preprocess_seconds=round(time.perf_counter() - started - download_seconds, 6),
        ),
    )


async def _send_failure(
    ad: AdRef, index: int, url: str, reason: str, message: str, started: float
) -> None:
    await image_outcomes_topic.send(
        key=ad.ad_id,
        value=ImageOutcome(
            ad=ad,
            index=index,
            url=url,
            error=ImageError(reason=reason, message=message),
            timings={"download_seconds": round(time.perf_counter() - started, 6)},
        ),
    )
