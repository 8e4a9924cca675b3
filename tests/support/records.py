"""Helpers of the in-process tests: result records, a MongoDB client, and stand-ins for what a
stage reads and writes (a recording sink, a raw event)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from classify_app.records import AdRef, AdResult, ImageOutcome, ImageResult, Label
from tables.store import ResultStore


def finished(
    ad_id: str = "ad-1",
    *,
    version: float = 100.0,
    request_id: str = "r1",
    catalog_ad_id: str | None = None,
    category: str = "vehicles",
) -> AdResult:
    return AdResult(
        ad_id=ad_id,
        request_id=request_id,
        catalog_name="cars",
        catalog_ad_id=catalog_ad_id or ad_id,
        status="done",
        image_count=1,
        images=[
            ImageResult(
                index=0,
                url="http://img/0",
                status="done",
                labels=[Label(name="moped", score=0.9)],
                category=category,
                category_scores={category: 0.9},
            )
        ],
        category=category,
        category_scores={category: 0.9},
        version=version,
        submitted_at=version,
        accepted_at=version,
        completed_at=version + 0.2,
    )


def ad_ref(request_id: str = "r1", version: float = 100.0, images: int = 2) -> AdRef:
    """A request for ad `ad-1`, as the download stage describes it."""
    return AdRef(
        ad_id="ad-1",
        request_id=request_id,
        catalog_name="cars",
        catalog_ad_id="c-1",
        image_count=images,
        version=version,
        submitted_at=version,
        accepted_at=version + 0.01,
    )


def image_success(ad: AdRef, index: int, category: str = "vehicles") -> ImageOutcome:
    """A classified image of `ad`, most likely `category`."""
    scores = {"vehicles": 0.0, "animals": 0.0, "other": 0.0}
    scores[category] = 0.9
    scores["other"] += 0.1
    return ImageOutcome(
        ad=ad,
        index=index,
        url=f"http://img/{index}",
        labels=[Label(name="moped", score=0.9)],
        category=category,
        category_scores=scores,
        model="m",
        model_version="1",
    )


def new_store(uri: str, database: str) -> ResultStore:
    """Another client on the same database (as a second worker would have)."""
    return ResultStore(uri, database, "ad_results", timeout_s=5)


class RecordingSink:
    """A `Sink` that keeps what a stage sent, in order; a send whose value `fail_when` picks
    raises instead, as a producer that lost its broker does."""

    def __init__(self, fail_when: Callable[[Any], bool] | None = None) -> None:
        self.records: list[tuple[Any, Any]] = []
        self.fail_when = fail_when

    async def send(self, *, key: Any = None, value: Any = None) -> None:
        """Called by the stage under test."""
        if self.fail_when is not None and self.fail_when(value):
            raise ConnectionError("the broker is gone")
        self.records.append((key, value))

    @property
    def values(self) -> list[Any]:
        """The records' values."""
        return [value for _, value in self.records]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` records were sent."""
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                await asyncio.sleep(0.01)


class RawEvent:
    """The parts of a Faust event that a stage reads: the raw value and where it came from."""

    def __init__(self, value: bytes, key: bytes = b"k", offset: int = 0) -> None:
        self.value = value
        self.message = SimpleNamespace(
            key=key,
            timestamp=time.time(),
            topic="ads",
            partition=0,
            offset=offset,
            tp=("ads", 0),
        )
