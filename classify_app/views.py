"""HTTP API on each worker's web port: submit an ad, read its result, health and readiness.

Submitting only validates and publishes the event: the prediction happens in the stream, and
the client polls the result URL (the request is decoupled from the prediction).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from faust import web
from pymongo.errors import PyMongoError

from agents.classify import batcher
from classify_app.application import app, metrics, runtime, settings, store, store_writer
from classify_app.metrics import CONTENT_TYPE, WorkerCollector
from classify_app.openapi import openapi_document
from classify_app.records import AdResult, InvalidEvent, parse_ad_event
from classify_app.topics import ads_topic
from tables.results import results_table
from tables.store import ResultStore

MAX_BODY_BYTES = 256 * 1024
MAX_LIST_LIMIT = 500
# Checks whose failure degrades the worker without making it unready.
DEGRADING = frozenset({"store"})


@app.page("/classify")
class SubmitAd(web.View):
    """`POST /classify`: validate an ad event and publish it to the `ads` topic (202)."""

    async def post(self, request: web.Request) -> web.Response:
        """Answer 202 with the ad id and the URL to poll, or 4xx with the reason."""
        if settings.api_token and not _authorized(request):
            response = _error(self, 401, "unauthorized", "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="classify-app"'
            return response
        body = await request.read()
        if len(body) > MAX_BODY_BYTES:
            return _error(self, 413, "too_large", f"bodies are limited to {MAX_BODY_BYTES} bytes")
        try:
            ad = parse_ad_event(body, max_images=settings.max_images_per_ad)
        except InvalidEvent as exc:
            return _error(self, 400, exc.reason, exc.message)
        await ads_topic.send(key=ad.ad_id, value=json.dumps(ad.asdict()).encode())
        return self.json(
            {
                "ad_id": ad.ad_id,
                "request_id": ad.request_id(),
                "status": "accepted",
                "result_url": f"/classify/results/{ad.ad_id}",
            },
            status=202,
        )


@app.page("/classify/results/{ad_id}")
class AdResultView(web.View):
    """`GET /classify/results/{ad_id}`: served by the worker that owns the ad's partition."""

    async def get(self, request: web.Request, ad_id: str) -> web.Response:
        """Route to the partition owner (Faust's table routing), then answer there. While the
        group rebalances the owner may be gone: then MongoDB answers for a finished ad, and
        otherwise 503 asks the client to retry."""
        await _load_partition_metadata(results_table.changelog_topic.get_topic_name())
        try:
            # Faust types the routed handler as taking (View, Request) only.
            return await self._get_routed(request, ad_id=ad_id)  # type: ignore[call-arg]
        except aiohttp.ClientError as exc:
            owner_error = exc
        if store is not None:
            with contextlib.suppress(PyMongoError):
                stored = await store.find(ad_id)
                if stored is not None:
                    return self.json(stored.asdict())
        response = _error(
            self,
            503,
            "owner_unreachable",
            f"the worker that owns ad {ad_id!r} did not answer ({type(owner_error).__name__}); "
            "the group is probably rebalancing, retry shortly",
        )
        response.headers["Retry-After"] = "1"
        return response

    @app.table_route(table=results_table, match_info="ad_id")  # type: ignore[arg-type]
    async def _get_routed(self, request: web.Request, **params: Any) -> web.Response:
        """The ad's result (`pending` while in flight); an ad the table does not hold (one
        classified long ago, or by a previous deployment) is looked up in MongoDB."""
        ad_id = params["ad_id"]
        result = results_table.get(ad_id)
        if result is not None:
            return self.json(result.asdict())
        return await _stored_result(self, f"ad {ad_id!r}", lambda mongo: mongo.find(ad_id))


@app.page("/classify/results")
class StoredResults(web.View):
    """`GET /classify/results?catalog=..&catalog_ad_id=..`: one ad by its catalog key;
    `GET /classify/results?category=..&limit=..`: the latest results of a category.
    Both answer from MongoDB."""

    async def get(self, request: web.Request) -> web.Response:
        """200 with the result (or `{"results": [...]}`), 400 for a bad query, 404 if unknown."""
        query = request.query
        if store is None:
            return _error(self, 501, "store_disabled", "this deployment keeps no MongoDB store")
        if "catalog" in query and "catalog_ad_id" in query:
            catalog, catalog_ad_id = query["catalog"], query["catalog_ad_id"]
            return await _stored_result(
                self,
                f"catalog ad {catalog!r}/{catalog_ad_id!r}",
                lambda mongo: mongo.find_by_catalog(catalog, catalog_ad_id),
            )
        if "category" in query:
            try:
                limit = int(query.get("limit", "50"))
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_LIST_LIMIT:
                return _error(self, 400, "invalid_query", f"limit must be 1-{MAX_LIST_LIMIT}")
            try:
                results = await store.latest_in_category(query["category"], limit)
            except PyMongoError as exc:
                return _store_unavailable(self, exc)
            return self.json({"results": [result.asdict() for result in results]})
        return _error(
            self,
            400,
            "invalid_query",
            "query by catalog=..&catalog_ad_id=.. or by category=..[&limit=..]",
        )


def _authorized(request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_token.encode()
    )


async def _stored_result(
    view: web.View, what: str, lookup: Callable[[ResultStore], Awaitable[AdResult | None]]
) -> web.Response:
    """The result MongoDB holds, or the error that says why there is none."""
    if store is None:
        return _error(view, 404, "unknown_ad", f"no classification for {what}")
    try:
        result = await lookup(store)
    except PyMongoError as exc:
        return _store_unavailable(view, exc)
    if result is None:
        return _error(view, 404, "unknown_ad", f"no classification for {what}")
    return view.json(result.asdict())


def _error(view: web.View, status: int, error: str, message: str) -> web.Response:
    return view.json({"error": error, "message": message}, status=status)


def _store_unavailable(view: web.View, exc: Exception) -> web.Response:
    return _error(view, 503, "store_unavailable", f"MongoDB did not answer: {type(exc).__name__}")


@app.page("/metrics")
class MetricsView(web.View):
    """`GET /metrics`: Prometheus text format (404 with `CLASSIFY_METRICS=false`)."""

    async def get(self, request: web.Request) -> web.Response:
        """Every stage's histograms and counters, consumer lag, memory, the store's state."""
        if not metrics.enabled:
            return _error(self, 404, "metrics_disabled", "CLASSIFY_METRICS is false")
        return self.bytes(metrics.exposition(), content_type=CONTENT_TYPE)


def _consumer_lag() -> dict[tuple[str, int], int]:
    consumer: Any = app.consumer
    lag = {}
    for tp in consumer.assignment():
        if tp.topic.endswith("-changelog") or "__assignor" in tp.topic:
            continue  # read only to recover tables, never committed: their lag means nothing
        highwater = consumer.highwater(tp)
        if highwater is None or highwater < 0:
            continue
        committed = consumer._committed_offset.get(tp) or 0
        lag[(tp.topic, tp.partition)] = max(0, highwater - committed)
    return lag


def _gpu_memory() -> dict[str, Any] | None:
    if not runtime.ready or not runtime.model.device.startswith("cuda"):
        return None
    import torch

    device = torch.device(runtime.model.device)
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "max_allocated": torch.cuda.max_memory_allocated(device),
    }


def _store_state() -> dict[str, float] | None:
    if store_writer is None:
        return None
    stats = store_writer.stats
    return {
        "buffered": store_writer.buffered,
        "up": 1.0 if store_writer.health.ok else 0.0,
        "written": stats.written,
        "stale": stats.stale,
        "rejected": stats.rejected,
        "retries": stats.retries,
    }


metrics.registry.register(
    WorkerCollector(
        lag=_consumer_lag,
        images_waiting=batcher.waiting,
        gpu_memory=_gpu_memory,
        store=_store_state,
    )
)


@app.page("/openapi.json")
class OpenAPIView(web.View):
    """`GET /openapi.json`: the OpenAPI 3.1 description of this API."""

    async def get(self, request: web.Request) -> web.Response:
        """The document from `classify_app/openapi.py`."""
        return self.json(openapi_document())


@app.page("/healthz")
class Health(web.View):
    """`GET /healthz`: the process is alive and serving HTTP."""

    async def get(self, request: web.Request) -> web.Response:
        """Always 200 while the event loop runs."""
        return self.json({"status": "ok", "time": time.time()})


@app.page("/readyz")
class Readiness(web.View):
    """`GET /readyz`: 200 when this worker can classify and serve results, else 503 and why."""

    async def get(self, request: web.Request) -> web.Response:
        """Model warmed, partitions assigned, tables recovered. A failing MongoDB degrades
        the worker (results wait in a buffer, then on Kafka) without making it unready."""
        checks = readiness_checks()
        ready = all(check["ok"] for name, check in checks.items() if name not in DEGRADING)
        degraded = ready and not all(check["ok"] for check in checks.values())
        status = "degraded" if degraded else "ready" if ready else "not_ready"
        return self.json(
            {"ready": ready, "status": status, "checks": checks}, status=200 if ready else 503
        )


async def _load_partition_metadata(topic: str) -> None:
    """Faust hashes a table key with the producer's partitioner, which only knows the topics
    it has produced to: a worker that never wrote to the changelog could not route a lookup."""
    producer: Any = app.producer
    await producer._ensure_producer().partitions_for(topic)


def readiness_checks() -> dict[str, dict[str, Any]]:
    """Each readiness condition with whether it holds and, if not, why."""
    recovery = cast(Any, app.tables).recovery
    # A worker may own no partition (more workers than partitions) and still be ready.
    joined = not app.rebalancing and _group.assigned
    checks: dict[str, dict[str, Any]] = {
        "model": {
            "ok": runtime.ready,
            "detail": runtime.error
            or (
                f"{runtime.model.name} {runtime.model.version} on {runtime.model.device}"
                if runtime.ready
                else "loading"
            ),
        },
        "partitions": {
            "ok": joined,
            "detail": f"{len(app.consumer.assignment())} partitions assigned"
            if joined
            else "joining the consumer group",
        },
        "tables": {
            "ok": recovery.completed.is_set(),
            "detail": "recovered" if recovery.completed.is_set() else "recovering",
        },
    }
    if store_writer is not None:
        health = store_writer.health
        checks["store"] = {"ok": health.ok, "detail": health.detail}
    return checks


class _GroupMembership:
    """Whether this worker has completed a consumer group join since it started."""

    assigned = False


_group = _GroupMembership()


@app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's stub wants a sync type
async def _on_partitions_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
    _group.assigned = True
