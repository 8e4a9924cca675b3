"""A small asynchronous HTTP client for a classify-app worker (no torch, no Faust needed).

async with AsyncClassifyClient("http://127.0.0.1:6066") as client:
    await client.submit({"ad_id": "42", "catalog_name": "cars", "images": [url]})
    result = await client.wait("42", timeout=10)
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import aiohttp

FINAL_STATUSES = frozenset({"done", "partial", "failed"})


class ClassifyError(Exception):
    """The service refused a request; `status` is the HTTP status, `reason` the error code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class AsyncClassifyClient:
    """Submit ads and read their results over a worker's HTTP API."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
        )

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
        """Close the HTTP session."""
        await self._session.close()

    async def submit(self, ad: dict[str, Any]) -> dict[str, Any]:
        """`POST /classify`: returns the acceptance (ad id, request id, result URL)."""
        async with self._session.post(f"{self.base_url}/classify", json=ad) as response:
            return await _answer(response, expected=202)

    async def result(self, ad_id: str) -> dict[str, Any] | None:
        """The ad's current result, or None if the service does not know the ad (yet).

        Raises `ClassifyError`; one with status 503 is temporary (workers rebalancing).
        """
        async with self._session.get(f"{self.base_url}/classify/results/{ad_id}") as response:
            if response.status == 404:
                return None
            return await _answer(response, expected=200)

    async def stored_result(self, catalog: str, catalog_ad_id: str) -> dict[str, Any] | None:
        """The result MongoDB holds for the ad known to `catalog` as `catalog_ad_id`, or None."""
        params = {"catalog": catalog, "catalog_ad_id": catalog_ad_id}
        async with self._session.get(
            f"{self.base_url}/classify/results", params=params
        ) as response:
            if response.status == 404:
                return None
            return await _answer(response, expected=200)

    async def wait(
        self, ad_id: str, *, timeout: float = 30.0, request_id: str | None = None
    ) -> dict[str, Any]:
        """Poll until the ad's result is final (done, partial or failed).

        With `request_id`, wait for that version of the ad. Raises `TimeoutError`.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                result = await self.result(ad_id)
            except ClassifyError as exc:
                if exc.status != 503:
                    raise
                result = None  # the workers are rebalancing: ask again
            if (
                result is not None
                and result["status"] in FINAL_STATUSES
                and request_id in (None, result["request_id"])
            ):
                return result
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"ad {ad_id} had no final result within {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)


async def _answer(response: aiohttp.ClientResponse, *, expected: int) -> dict[str, Any]:
    body = await response.json(content_type=None)
    if response.status != expected:
        raise ClassifyError(
            response.status, body.get("error", "http_error"), body.get("message", str(body))
        )
    return dict(body)
