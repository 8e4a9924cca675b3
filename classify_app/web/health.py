"""`GET /healthz` (the process serves HTTP) and `GET /readyz` (it can classify and serve
results), the probes an orchestrator restarts and routes by."""

from __future__ import annotations

import time
from typing import Any, cast

from faust import web

from classify_app.application import app

# Checks whose failure degrades the worker without making it unready.
DEGRADING = frozenset({"store"})


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


def readiness_checks() -> dict[str, dict[str, Any]]:
    """Each readiness condition with whether it holds and, if not, why."""
    runtime = app.parts.runtime
    model = runtime.model
    recovery = cast(Any, app.tables).recovery
    # A worker may own no partition (more workers than partitions) and still be ready.
    joined = not app.rebalancing and app.joined_group
    checks: dict[str, dict[str, Any]] = {
        "model": {
            "ok": runtime.ready,
            "detail": runtime.error
            or (f"{model.name} {model.version} on {model.device}" if runtime.ready else "loading"),
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
    feeder = app.parts.index_feeder
    if feeder is not None:
        # Duplicates found before the index has read every earlier ad would be missed.
        checks["similarity"] = {
            "ok": feeder.caught_up.is_set(),
            "detail": f"{len(feeder.index)} images of {feeder.index.ads} ads indexed"
            if feeder.caught_up.is_set()
            else f"reading the vectors topic ({feeder.records} records so far)",
        }
    writer = app.parts.writer
    if writer is not None:
        health = writer.health
        if health.broken:  # an operator must act: not merely degraded
            checks["schema"] = {"ok": False, "detail": health.detail}
        else:
            checks["store"] = {"ok": health.ok, "detail": health.detail}
    return checks
