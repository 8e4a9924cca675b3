"""The metrics functions and the JSON log format, without a worker."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from classify_app.logs import JsonFormatter
from classify_app.metrics import Metrics, WorkerCollector
from classify_app.records import AdResult, ImageError, ImageResult

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "classify-app.json"


def result() -> AdResult:
    return AdResult(
        ad_id="ad-1",
        request_id="r1",
        catalog_name="cars",
        catalog_ad_id="ad-1",
        status="partial",
        image_count=2,
        images=[
            ImageResult(index=0, url="http://img/0", status="done"),
            ImageResult(
                index=1,
                url="http://img/1",
                status="failed",
                error=ImageError(reason="http_404", message="gone"),
            ),
        ],
        submitted_at=100.0,
    )


def test_a_finished_ad_counts_its_images_and_reasons() -> None:
    metrics = Metrics()
    metrics.ad_finished(result(), now=100.25)
    text = metrics.exposition().decode()
    assert 'classify_ads_total{status="partial"} 1.0' in text
    assert 'classify_images_total{status="done"} 1.0' in text
    assert 'classify_image_failures_total{reason="http_404"} 1.0' in text
    assert "classify_end_to_end_seconds_sum 0.25" in text
    assert 'classify_end_to_end_seconds_bucket{le="0.5"} 1.0' in text


def test_disabled_metrics_record_nothing() -> None:
    metrics = Metrics(enabled=False)
    metrics.ad_finished(result(), now=101.0)
    metrics.batch_classified(4, 0.1, [0.01] * 4)
    text = metrics.exposition().decode()
    assert "classify_ads_total{" not in text
    assert "classify_batch_size_count 0.0" in text


def test_json_logs_carry_the_ad_and_the_stage() -> None:
    record = logging.LogRecord(
        "agents.download", logging.WARNING, "x", 1, "failed %s", ("x",), None
    )
    record.ad_id = "ad-7"
    record.stage = "download"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed x"
    assert entry["level"] == "warning"
    assert entry["ad_id"] == "ad-7" and entry["stage"] == "download"
    assert entry["time"].endswith("+00:00")


def test_the_grafana_dashboard_uses_only_metrics_the_worker_exports() -> None:
    metrics = Metrics()
    metrics.registry.register(
        WorkerCollector(
            lag=lambda: {("ads", 0): 3},
            images_waiting=lambda: 0,
            gpu_memory=lambda: {"allocated": 1, "reserved": 2, "max_allocated": 3},
            store=lambda: dict.fromkeys(
                ("buffered", "up", "written", "stale", "rejected", "retries"), 0.0
            ),
        )
    )
    # Labelled metrics have samples once a child exists.
    metrics.image_downloaded(0.1, ok=True)
    metrics.ad_finished(result(), now=101.0)
    metrics.dead_lettered("malformed_json")
    metrics.model.info({"name": "m"})
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {
        name
        for expression in expressions
        for name in re.findall(r"\b(?:classify|process)_[a-z_]+", expression)
    }
    assert used and used <= exported, used - exported
