"""The store of record: every finished ad result in MongoDB, for other services to query.

The results table (`tables/results.py`) is the workers' partitioned working state; this
collection outlives deployments and answers lookups by ad id, by catalog key and by category.
One document per ad, `_id` = ad id. Writes are idempotent, version-guarded upserts sent as one
unordered bulk: replaying a result changes nothing, an older result never replaces a newer
one, and concurrent first writes cannot create two documents (the unique indexes decide, and
a lost race is retried as an update, never find-then-insert).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from classify_app.records import AdResult
from tables.merge import request_order

DUPLICATE_KEY = 11000
# A lost insert race is retried as an update; a key still taken after this many tries belongs
# to another ad.
RACE_RETRIES = 3


@dataclass
class WriteReport:
    """What one `upsert_many` call did with each result."""

    written: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    # Ad id -> why MongoDB refused the document for good (another ad holds its catalog key).
    rejected: dict[str, str] = field(default_factory=dict)


class ResultStore:
    """The MongoDB collection of ad results, through PyMongo's asyncio client.

    The client connects lazily, on the first operation, inside the caller's event loop.
    Every operation raises a `pymongo.errors.PyMongoError` when MongoDB cannot be reached
    within `timeout_s`; retrying is the caller's decision (see `tables/writer.py`).
    """

    def __init__(self, uri: str, database: str, collection: str, timeout_s: float = 5.0) -> None:
        self.uri = uri
        self.database_name = database
        self.collection_name = collection
        self.timeout_s = timeout_s
        self._client: AsyncMongoClient[dict[str, Any]] | None = None

    @property
    def client(self) -> AsyncMongoClient[dict[str, Any]]:
        """The shared client, created on first use."""
        if self._client is None:
            timeout_ms = int(self.timeout_s * 1000)
            self._client = AsyncMongoClient(
                self.uri,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
                socketTimeoutMS=4 * timeout_ms,
                tz_aware=True,
                appname="classify-app",
            )
        return self._client

    @property
    def database(self) -> AsyncDatabase[dict[str, Any]]:
        """The service's database."""
        return self.client[self.database_name]

    @property
    def results(self) -> AsyncCollection[dict[str, Any]]:
        """The ad results collection."""
        return self.database[self.collection_name]

    async def ping(self) -> None:
        """Raise unless the server answers."""
        await self.database.command("ping")

    async def close(self) -> None:
        """Close the client's connections (a later call opens new ones)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def upsert_many(self, results: Iterable[AdResult]) -> WriteReport:
        """Write the results in one unordered bulk; replays and older versions change nothing.

        Results for the same ad are reduced to the newest first. Raises `PyMongoError` when
        the bulk could not be sent or acknowledged (nothing is lost by sending it again).
        """
        latest: dict[str, AdResult] = {}
        for result in results:
            held = latest.get(result.ad_id)
            if held is None or order_key(held) <= order_key(result):
                latest[result.ad_id] = result
        report = WriteReport()
        pending = list(latest.values())
        for _ in range(RACE_RETRIES):
            refused = await self._bulk_upsert(pending, report)
            if not refused:
                return report
            pending = await self._sort_refused(refused, report)
            if not pending:
                return report
        for result in pending:
            report.rejected[result.ad_id] = (
                f"catalog ad ({result.catalog_name!r}, {result.catalog_ad_id!r}) "
                "already belongs to another ad id"
            )
        return report

    async def find(self, ad_id: str) -> AdResult | None:
        """The stored result of an ad, or None."""
        return _result(await self.results.find_one({"_id": ad_id}))

    async def find_by_catalog(self, catalog_name: str, catalog_ad_id: str) -> AdResult | None:
        """The stored result of the ad known to its catalog as `catalog_ad_id`, or None."""
        document = await self.results.find_one(
            {"catalog_name": catalog_name, "catalog_ad_id": catalog_ad_id}
        )
        return _result(document)

    async def latest_in_category(self, category: str, limit: int = 50) -> list[AdResult]:
        """The most recently updated results of a category, newest first."""
        cursor = self.results.find({"category": category}).sort("updated_at", -1).limit(limit)
        return [result for document in await cursor.to_list() if (result := _result(document))]

    async def _bulk_upsert(
        self, results: Sequence[AdResult], report: WriteReport
    ) -> list[AdResult]:
        """Send the upserts; returns the results refused with a duplicate key."""
        now = datetime.now(UTC)  # one update time for the whole bulk
        upserts = [_upsert(result, now) for result in results]
        try:
            await self.results.bulk_write(upserts, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            refused: list[AdResult] = []
            failed: set[int] = set()
            for error in exc.details["writeErrors"]:
                failed.add(error["index"])
                result = results[error["index"]]
                if error["code"] == DUPLICATE_KEY:
                    refused.append(result)
                else:
                    report.rejected[result.ad_id] = error.get("errmsg", "rejected by MongoDB")
            report.written.extend(
                result.ad_id for index, result in enumerate(results) if index not in failed
            )
            return refused
        report.written.extend(result.ad_id for result in results)
        return []

    async def _sort_refused(self, refused: list[AdResult], report: WriteReport) -> list[AdResult]:
        """After a duplicate key: stale if a newer result is stored, else worth another try.

        An upsert whose guard did not match tries to insert and meets the `_id` (or catalog)
        index. If the stored document is newer, the result is stale; if it is older, another
        writer inserted it in the meantime and the upsert now matches as an update; if there
        is no document with this ad id, the catalog key is taken by another ad.
        """
        stored = {
            document["_id"]: document
            async for document in self.results.find(
                {"_id": {"$in": [result.ad_id for result in refused]}},
                {"order_key": 1},
            )
        }
        again: list[AdResult] = []
        for result in refused:
            document = stored.get(result.ad_id)
            if document is not None and document["order_key"] > order_key(result):
                report.stale.append(result.ad_id)
            else:
                again.append(result)
        return again


def result_document(result: AdResult) -> dict[str, Any]:
    """The result as plain BSON-ready values (the same shape as the API's JSON)."""
    document: dict[str, Any] = json.loads(result.dumps())
    return document


def order_key(result: AdResult) -> str:
    """Orders the results of one ad as the results table does (`merge.request_order`), in one
    string: a guard on a single field keeps the upsert on the `_id` index (an `$or` of
    several fields made SecantusDB scan the collection)."""
    version, submitted_at, request_id = request_order(result)
    return f"{version:020.6f}|{submitted_at:020.6f}|{request_id}"


def _upsert(result: AdResult, now: datetime) -> UpdateOne:
    key = order_key(result)
    return UpdateOne(
        # Matches only a stored result that is not newer than this one.
        {"_id": result.ad_id, "order_key": {"$lte": key}},
        {
            "$set": {**result_document(result), "order_key": key, "updated_at": now},
            "$setOnInsert": {"created_at": now},
        },
        upsert=True,
    )


def _result(document: dict[str, Any] | None) -> AdResult | None:
    if document is None:
        return None
    fields = AdResult._options.fields
    return AdResult.from_data({name: value for name, value in document.items() if name in fields})
