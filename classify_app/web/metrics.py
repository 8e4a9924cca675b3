"""`GET /metrics`: the worker's Prometheus metrics (`classify_app/metrics.py`)."""

from __future__ import annotations

from faust import web

from classify_app.application import app
from classify_app.metrics import CONTENT_TYPE
from classify_app.vocabulary import ApiError
from classify_app.web.api import error


@app.page("/metrics")
class MetricsView(web.View):
    """`GET /metrics`: Prometheus text format (404 with `CLASSIFY_METRICS=false`)."""

    async def get(self, request: web.Request) -> web.Response:
        """Every stage's histograms and counters, consumer lag, memory, the store's state."""
        metrics = app.parts.metrics
        if not metrics.enabled:
            return error(self, 404, ApiError.METRICS_DISABLED, "CLASSIFY_METRICS is false")
        return self.bytes(metrics.exposition(), content_type=CONTENT_TYPE)
