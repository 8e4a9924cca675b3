"""Stage 1: `ads` -> prepared images. Validates each ad event, downloads its images and
preprocesses them for the model.

Every image leaves this stage exactly once: handed to the inference stage (`agents/classify.py`,
in memory) as a `PreparedImage`, or as an `ImageOutcome` carrying the reason it failed. An ad's
event is acknowledged once each of its images has its outcome. A malformed event goes to the
dead-letter topic. Nothing here raises out of the agent: the worker keeps going whatever the input.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import mode
import numpy as np
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from faust.types import EventT
from yarl import URL

from agents.acks import InOrderAcks, LeaveUnacknowledged
from agents.classify import PreparedImage, batcher
from agents.dead_letters import dead_letter
from classify_app.application import app, metrics, runtime, settings
from classify_app.records import (
    AdAccepted,
    AdEvent,
    AdRef,
    ImageError,
    ImageOutcome,
    ImageRetry,
    InvalidEvent,
    parse_ad_event,
)
from classify_app.settings import Settings
from classify_app.topics import ads_topic, download_retries_topic, image_outcomes_topic
from models import ImageModel, ImageRejected, decode_image

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK_BYTES = 64 * 1024


REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Worth another attempt later: the server or the network may recover. Everything else (4xx,
# not an image, too large, forbidden) would fail the same way again.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_408", "http_429"})


def is_transient(reason: str) -> bool:
    """True for a download failure that a later attempt may not meet."""
    return reason in TRANSIENT_REASONS or reason.startswith("http_5")


class ForbiddenAddress(OSError):
    """A host resolved only to addresses the downloader must not reach."""


class AddressGuard:
    """Decides which IP addresses the downloader may connect to.

    Only globally routable unicast addresses, unless an address is inside one of the
    `CLASSIFY_DOWNLOAD_ALLOW_NETS` networks: loopback, private, link-local (cloud metadata
    at 169.254.169.254), shared, multicast, reserved and unspecified addresses are refused,
    also when they hide in an IPv4-mapped IPv6 address.
    """

    def __init__(self, allow_nets: str) -> None:
        self.allowed_networks = [
            ipaddress.ip_network(net.strip(), strict=False)
            for net in allow_nets.split(",")
            if net.strip()
        ]

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be reached, or None if it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return None
        if ip.is_multicast or not ip.is_global:
            return f"{ip} is not a public address"
        return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses `AddressGuard` allows.

    The connection is made to an address checked here, so a name that resolves to a public
    address when checked and a private one when connecting (DNS rebinding) cannot get through.
    """

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Called by aiohttp's connector for every new connection to a host name."""
        results = await self._resolver.resolve(host, port, family)
        allowed = [result for result in results if self.guard.refusal(result["host"]) is None]
        if not allowed:
            refusal = self.guard.refusal(results[0]["host"]) if results else "no address"
            raise ForbiddenAddress(f"{host}: {refusal}")
        return allowed

    async def close(self) -> None:
        """Called when the session closes."""
        await self._resolver.close()


class ImageDownloader:
    """Fetches image bytes with one shared HTTP session and hard limits.

    Limits: `download_connections` connections, a connect timeout and a total timeout per
    image, a byte limit checked while streaming, and a bounded number of redirects, each hop
    checked again. Only http(s) URLs, and only public addresses (`AddressGuard`). Failures
    raise `ImageRejected` with a reason code.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = AddressGuard(settings.download_allow_nets)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.download_timeout_s, sock_connect=settings.download_connect_timeout_s
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.download_connections,
                    ttl_dns_cache=300,
                    resolver=GuardedResolver(self.guard),
                ),
                timeout=self._timeout,
                headers={"User-Agent": "classify-app/0.1 (+image classification)"},
                auto_decompress=True,
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        """Download one image's bytes, or raise `ImageRejected`."""
        target = self._checked_url(url)
        try:
            async with asyncio.timeout(self.settings.download_timeout_s):
                return await self._fetch(target)
        except ImageRejected:
            raise
        except TimeoutError:
            raise ImageRejected(
                "timeout", f"no complete answer within {self.settings.download_timeout_s:g} s"
            ) from None
        except aiohttp.InvalidURL as exc:
            raise ImageRejected("invalid_url", f"invalid URL: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            refused = getattr(exc, "os_error", None)  # set by GuardedResolver's refusal
            if isinstance(refused, ForbiddenAddress):
                raise ImageRejected("forbidden_address", _forbidden(str(refused))) from None
            raise ImageRejected("connection_error", f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise ImageRejected("http_error", f"{type(exc).__name__}: {exc}") from None

    async def _fetch(self, url: URL) -> bytes:
        for _ in range(self.settings.download_max_redirects + 1):
            async with self._get_session().get(url, allow_redirects=False) as response:
                if response.status not in REDIRECTS:
                    return await self._read(response)
                location = response.headers.get("Location")
                if not location:
                    raise ImageRejected(
                        f"http_{response.status}", "a redirect without a Location header"
                    )
                url = self._checked_url(str(url.join(URL(location))))
        raise ImageRejected(
            "too_many_redirects", f"more than {self.settings.download_max_redirects} redirects"
        )

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.download_max_bytes
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

    def _checked_url(self, url: str) -> URL:
        """The URL if it may be fetched: http(s), a host, not a forbidden IP literal (host
        names are checked when they are resolved, by `GuardedResolver`)."""
        try:
            target = URL(url)
        except (ValueError, TypeError) as exc:
            raise ImageRejected("invalid_url", f"invalid URL: {exc}") from None
        if not target.scheme:
            raise ImageRejected("invalid_url", f"not an absolute URL: {url[:200]!r}")
        if target.scheme not in ("http", "https"):
            raise ImageRejected(
                "unsupported_scheme", f"only http and https URLs are fetched, not {url[:200]!r}"
            )
        if not target.host:
            raise ImageRejected("invalid_url", f"the URL has no host: {url[:200]!r}")
        try:
            refusal = self.guard.refusal(target.host)
        except ValueError:
            return target  # a host name
        if refusal is not None:
            raise ImageRejected("forbidden_address", _forbidden(refusal))
        return target


def _forbidden(refusal: str) -> str:
    return f"{refusal}; private networks are reached only through CLASSIFY_DOWNLOAD_ALLOW_NETS"


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
        batcher.abandon_waiting()  # stopping: what has not started is processed again later
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
    except LeaveUnacknowledged:
        raise  # processed again later; see `InOrderAcks`
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
    # Every image finishes before the ad's handler does: its slot bounds the images held.
    outcomes = await asyncio.gather(
        *(process_image(ref, index, url) for index, url in enumerate(ad.images)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def process_image(ad: AdRef, index: int, url: str, attempt: int = 1) -> None:
    """Download and preprocess one image; hand it to inference, or emit its retry or failure."""
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
        if is_transient(exc.reason) and attempt < settings.download_attempts:
            await schedule_retry(ad, index, url, attempt, exc)
        else:
            message = exc.message if attempt == 1 else f"{exc.message} (after {attempt} attempts)"
            await _send_failure(ad, index, url, exc.reason, message, started)
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
    try:
        await batcher.classify(
            PreparedImage(
                ad=ad,
                index=index,
                url=url,
                pixels=pixels,
                download_seconds=round(download_seconds, 6),
                preprocess_seconds=round(time.perf_counter() - started - download_seconds, 6),
            )
        )
    except LeaveUnacknowledged:
        raise  # not the image's fault: its ad is processed again later
    except Exception as exc:
        await _send_failure(ad, index, url, "internal_error", repr(exc), started)


async def schedule_retry(
    ad: AdRef, index: int, url: str, attempt: int, failure: ImageRejected
) -> None:
    """Hand a transiently failed image to the retry stage, due after an exponential delay
    (`download_retry_delay_s` x 4^(attempt-1)): the ad's other images go on meanwhile."""
    delay = settings.download_retry_delay_s * 4 ** (attempt - 1)
    await download_retries_topic.send(
        key=ad.ad_id,
        value=ImageRetry(
            ad=ad,
            index=index,
            url=url,
            attempt=attempt + 1,
            due_at=time.time() + delay,
            reason=failure.reason,
            message=failure.message,
        ),
    )
    metrics.download_retried(failure.reason)


@app.agent(download_retries_topic)
async def retry_downloads(stream: Any) -> None:
    """Try each image again once it is due, up to `download_concurrency` at once.

    Retries are due in roughly the order they arrive (their delay grows with the attempt),
    so this stage waits for the head of its partition; the main download stage never waits.
    Offsets are committed past an image only once its new attempt has an outcome.
    """
    unacked = stream.noack()
    acks = InOrderAcks(unacked, limit=settings.download_concurrency)
    try:
        async for event in unacked.events():
            retry: ImageRetry = event.value
            wait = retry.due_at - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await acks.submit(
                event, process_image(retry.ad, retry.index, retry.url, attempt=retry.attempt)
            )
    finally:
        batcher.abandon_waiting()  # stopping: what has not started is processed again later
        await acks.drain()


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
