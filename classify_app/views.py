"""HTTP API on each worker's web port: submit an ad, read its result, health and readiness.

Submitting only validates and publishes the event: the prediction happens in the stream, and
the client polls the result URL (the request is decoupled from the prediction).
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from faust import web

from classify_app.app import app, runtime, settings
from classify_app.records import InvalidEvent, parse_ad_event
from classify_app.topics import ads_topic
from tables.results import results_table

MAX_BODY_BYTES = 256 * 1024


@app.page("/classify")
class SubmitAd(web.View):
    """`POST /classify`: validate an ad event and publish it to the `ads` topic (202)."""

    async def post(self, request: web.Request) -> web.Response:
        """Answer 202 with the ad id and the URL to poll, or 4xx with the reason."""
        body = await request.read()
        if len(body) > MAX_BODY_BYTES:
            return self.json(
                {"error": "too_large", "message": f"bodies are limited to {MAX_BODY_BYTES} bytes"},
                status=413,
            )
        try:
            ad = parse_ad_event(body, max_images=settings.max_images_per_ad)
        except InvalidEvent as exc:
            return self.json({"error": exc.reason, "message": exc.message}, status=400)
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
        """Route to the partition owner (Faust's table routing), then answer there."""
        await _load_partition_metadata(results_table.changelog_topic.get_topic_name())
        # Faust types the routed handler as taking (View, Request) only.
        return await self._get_routed(request, ad_id=ad_id)  # type: ignore[call-arg]

    @app.table_route(table=results_table, match_info="ad_id")  # type: ignore[arg-type]
    async def _get_routed(self, request: web.Request, **params: Any) -> web.Response:
        """The ad's result (`pending` while in flight), or 404 for an unknown ad."""
        ad_id = params["ad_id"]
        result = results_table.get(ad_id)
        if result is None:
            return self.json(
                {"error": "unknown_ad", "message": f"no classification for ad {ad_id!r}"},
                status=404,
            )
        return self.json(result.asdict())


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
        """Model warmed, partitions assigned, tables recovered."""
        checks = readiness_checks()
        ready = all(check["ok"] for check in checks.values())
        return self.json({"ready": ready, "checks": checks}, status=200 if ready else 503)


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
    return {
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


class _GroupMembership:
    """Whether this worker has completed a consumer group join since it started."""

    assigned = False


_group = _GroupMembership()


@app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's stub wants a sync type
async def _on_partitions_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
    _group.assigned = True
