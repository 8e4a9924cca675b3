"""The clients of the SDK (`classify_app.sdk`): `ClassifyClient` for scripts and
`AsyncClassifyClient`, the same for asyncio code, sharing one implementation.

Ads go over HTTP (`POST /classify`) by default, or straight to Kafka with `kafka_bootstrap=`
(aiokafka, the `kafka` extra; the ad is validated by the worker then, and a malformed one ends
on the dead-letter topic). Results are typed objects (`ClassificationResult`,
`ImageClassification`, `Label`, `ImageFailure`); `.raw` keeps the JSON. Errors are
`ClassifyError` (with the HTTP status and the service's reason code), `ClassifyUnavailable`
(no answer) and `ClassifyTimeout` (no final result in time).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from classify_app.identity import epoch_seconds, request_id, result_path
from classify_app.vocabulary import FINAL_STATUSES, Label


class ClassifyError(Exception):
    """The service refused a request; `status` is the HTTP status, `reason` the error code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def temporary(self) -> bool:
        """True when asking again later may work (503: starting or rebalancing)."""
        return self.status in (502, 503, 504)


class ClassifyUnavailable(ClassifyError):
    """The service did not answer at all (connection refused, reset, timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unavailable", message)

    @property
    def temporary(self) -> bool:
        """Always worth another try."""
        return True


class ClassifyTimeout(ClassifyError, TimeoutError):
    """`wait` gave up: the ad had no final result within the timeout."""

    def __init__(self, ad_id: str, timeout: float) -> None:
        super().__init__(0, "timeout", f"ad {ad_id} had no final result within {timeout:g} s")


@dataclass(frozen=True)
class ImageFailure:
    """Why an image has no prediction: a stable reason code and a readable message."""

    reason: str
    message: str


@dataclass(frozen=True)
class ImageClassification:
    """One image of an ad: its labels and category, or its failure."""

    index: int
    url: str
    status: str
    labels: list[Label] = field(default_factory=list)
    category: str | None = None
    category_scores: dict[str, float] = field(default_factory=dict)
    error: ImageFailure | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageClassification:
        """From the `images[]` items of a result."""
        error = data.get("error")
        return cls(
            index=data["index"],
            url=data["url"],
            status=data["status"],
            labels=[Label(label["name"], label["score"]) for label in data.get("labels") or []],
            category=data.get("category"),
            category_scores=dict(data.get("category_scores") or {}),
            error=ImageFailure(error["reason"], error["message"]) if error else None,
        )


@dataclass(frozen=True)
class SimilarAd:
    """Another ad whose image is near one of this ad's (or the photo asked about)."""

    ad_id: str
    image_index: int  # the image of the ad asked about (0 for a photo by URL)
    matched_image_index: int  # the other ad's image
    score: float  # cosine similarity of their embeddings

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimilarAd:
        return cls(
            data["ad_id"], int(data["image_index"]), int(data["matched_image_index"]),
            float(data["score"]),
        )  # fmt: skip


@dataclass(frozen=True)
class ClassificationResult:
    """An ad's result: `pending`, then `done`, `partial` (some images failed) or `failed`."""

    ad_id: str
    request_id: str
    catalog_name: str
    catalog_ad_id: str
    status: str
    image_count: int
    images: list[ImageClassification]
    category: str | None
    category_scores: dict[str, float]
    model: str | None
    latency_seconds: float | None
    flags: list[str]  # e.g. ["nsfw"]
    duplicates: list[SimilarAd]  # images of earlier ads this ad's images nearly repeat
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def final(self) -> bool:
        """True once every image has an outcome."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassificationResult:
        """From the JSON the API serves (and the `results` topic carries)."""
        return cls(
            ad_id=data["ad_id"],
            request_id=data["request_id"],
            catalog_name=data["catalog_name"],
            catalog_ad_id=data["catalog_ad_id"],
            status=data["status"],
            image_count=data["image_count"],
            images=[ImageClassification.from_json(image) for image in data.get("images") or []],
            category=data.get("category"),
            category_scores=dict(data.get("category_scores") or {}),
            model=data.get("model"),
            latency_seconds=data.get("latency_seconds"),
            flags=list(data.get("flags") or []),
            duplicates=[SimilarAd.from_json(d) for d in data.get("duplicates") or []],
            raw=data,
        )


@dataclass(frozen=True)
class Acceptance:
    """The service took the ad in; poll `result_url` (or `wait`) for the result."""

    ad_id: str
    request_id: str
    result_url: str


class AsyncClassifyClient:
    """Submit ads and read their results over a worker's HTTP API (or submit to Kafka)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        kafka_bootstrap: str | None = None,
        kafka_options: dict[str, Any] | None = None,
        ads_topic: str = "ads",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.kafka_bootstrap = kafka_bootstrap
        # aiokafka's own keyword arguments: security_protocol, ssl_context, sasl_mechanism,
        # sasl_plain_username, sasl_plain_password (a secured cluster).
        self.kafka_options = dict(kafka_options or {})
        self.ads_topic = ads_topic
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
        )
        self._producer: Any = None

    async def __aenter__(self) -> AsyncClassifyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (and the Kafka producer)."""
        await self._session.close()
        if self._producer is not None:
            await self._producer.stop()

    async def submit(self, ad: dict[str, Any]) -> Acceptance:
        """Submit one ad event: `POST /classify`, or a Kafka message with `kafka_bootstrap`."""
        if self.kafka_bootstrap:
            return await self._produce(ad)
        body = await self._request("POST", "/classify", expected=202, json=ad)
        assert body is not None
        return Acceptance(body["ad_id"], body["request_id"], body["result_url"])

    async def result(self, ad_id: str) -> ClassificationResult | None:
        """The ad's current result, or None if the service does not know the ad (yet)."""
        body = await self._request("GET", result_path(ad_id), expected=200)
        return None if body is None else ClassificationResult.from_json(body)

    async def stored_result(self, catalog: str, catalog_ad_id: str) -> ClassificationResult | None:
        """The result MongoDB holds for the ad known to `catalog` as `catalog_ad_id`, or None."""
        params = {"catalog": catalog, "catalog_ad_id": catalog_ad_id}
        body = await self._request("GET", "/classify/results", expected=200, params=params)
        return None if body is None else ClassificationResult.from_json(body)

    async def similar(
        self, ad_id: str, *, k: int = 10, image: int | None = None
    ) -> list[SimilarAd] | None:
        """The `k` other ads most similar to the ad (any of its images, or image `image`),
        best first; None for an ad without an indexed image. Any worker answers the same."""
        params = {"k": str(k)} | ({} if image is None else {"image": str(image)})
        path = "/classify/similar/" + quote(ad_id, safe="")
        body = await self._request("GET", path, expected=200, params=params)
        return None if body is None else [SimilarAd.from_json(n) for n in body["similar"]]

    async def similar_to(self, url: str, *, k: int = 10) -> list[SimilarAd]:
        """The `k` ads most similar to the photo at `url` (the worker downloads it)."""
        params = {"url": url, "k": str(k)}
        body = await self._request("GET", "/classify/similar", expected=200, params=params)
        if body is None:
            raise ClassifyError(404, "not_found", "this service has no /classify/similar")
        return [SimilarAd.from_json(n) for n in body["similar"]]

    async def wait(
        self, ad_id: str, *, timeout: float = 30.0, request_id: str | None = None
    ) -> ClassificationResult:
        """Poll, backing off from 20 ms to 0.5 s, until the ad's result is final.

        With `request_id`, wait for that version of the ad. Temporary errors (the workers
        starting or rebalancing) are waited out; raises `ClassifyTimeout`.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                result = await self.result(ad_id)
            except ClassifyError as exc:
                if not exc.temporary:
                    raise
                result = None
            if result is not None and result.final and request_id in (None, result.request_id):
                return result
            if time.monotonic() + delay > deadline:
                raise ClassifyTimeout(ad_id, timeout)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def _request(
        self, method: str, path: str, *, expected: int, **kwargs: Any
    ) -> dict[str, Any] | None:
        """The JSON answer, None for a 404 on a lookup, else raises."""
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as response:
                if response.status == 404 and method == "GET":
                    return None
                try:
                    body = await response.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError):
                    body = {"message": (await response.text())[:200]}
                if response.status != expected:
                    raise ClassifyError(
                        response.status,
                        body.get("error", "http_error"),
                        body.get("message", str(body)),
                    )
                return dict(body)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ClassifyUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def _produce(self, ad: dict[str, Any]) -> Acceptance:
        from aiokafka import AIOKafkaProducer

        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.kafka_bootstrap, acks="all", **self.kafka_options
            )
            await self._producer.start()
        ad_id = str(ad.get("ad_id", ""))
        await self._producer.send_and_wait(
            self.ads_topic, json.dumps(ad).encode(), key=ad_id.encode()
        )
        return Acceptance(ad_id, _request_id(ad), result_path(ad_id))


def _request_id(ad: dict[str, Any]) -> str:
    """The id the worker will give this version of the ad (for a valid event)."""
    ad_id = str(ad.get("ad_id"))
    try:
        updated_at = epoch_seconds(ad.get("updated_at"))
    except (TypeError, ValueError):
        updated_at = None  # an invalid time: the worker dead-letters the event anyway
    return request_id(
        ad_id=ad_id,
        catalog_name=ad.get("catalog_name", ""),
        catalog_ad_id=str(ad.get("catalog_ad_id") or ad_id),
        images=ad.get("images", []),
        updated_at=updated_at,
        event_id=ad.get("event_id"),
    )


class ClassifyClient:
    """The blocking client, for scripts: the same methods as `AsyncClassifyClient`.

    Runs its own event loop; use it outside asyncio code (inside, use the async client).
    """

    def __init__(self, base_url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(_make_client(base_url, options))

    def __enter__(self) -> ClassifyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and the event loop."""
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()

    def submit(self, ad: dict[str, Any]) -> Acceptance:
        """See `AsyncClassifyClient.submit`."""
        return self._loop.run_until_complete(self._client.submit(ad))

    def result(self, ad_id: str) -> ClassificationResult | None:
        """See `AsyncClassifyClient.result`."""
        return self._loop.run_until_complete(self._client.result(ad_id))

    def stored_result(self, catalog: str, catalog_ad_id: str) -> ClassificationResult | None:
        """See `AsyncClassifyClient.stored_result`."""
        return self._loop.run_until_complete(self._client.stored_result(catalog, catalog_ad_id))

    def similar(
        self, ad_id: str, *, k: int = 10, image: int | None = None
    ) -> list[SimilarAd] | None:
        """See `AsyncClassifyClient.similar`."""
        return self._loop.run_until_complete(self._client.similar(ad_id, k=k, image=image))

    def similar_to(self, url: str, *, k: int = 10) -> list[SimilarAd]:
        """See `AsyncClassifyClient.similar_to`."""
        return self._loop.run_until_complete(self._client.similar_to(url, k=k))

    def wait(
        self, ad_id: str, *, timeout: float = 30.0, request_id: str | None = None
    ) -> ClassificationResult:
        """See `AsyncClassifyClient.wait`."""
        return self._loop.run_until_complete(
            self._client.wait(ad_id, timeout=timeout, request_id=request_id)
        )


async def _make_client(base_url: str, options: dict[str, Any]) -> AsyncClassifyClient:
    # aiohttp binds its session to the loop it is created in.
    return AsyncClassifyClient(base_url, **options)
