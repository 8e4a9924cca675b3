"""The Faust application: one `faust.App`, configured from `Settings`, and the model it serves.

`faust -A classify_app worker` imports this module; the agents, tables and web views are found
by autodiscovery, so following an ad means opening `agents/download.py`, `agents/classify.py`,
`agents/results.py`, `tables/results.py`, `agents/store.py`, `tables/writer.py`,
`tables/store.py` and `classify_app/views.py` in that order.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.types import TransportT

from classify_app.consumer import LocalTransport, Transport
from classify_app.logs import use_json_logs
from classify_app.metrics import Metrics
from classify_app.settings import Settings
from models import ImageModel, create_model
from models.runtime import ModelRuntime
from tables.store import ResultStore
from tables.writer import ResultWriter

log = logging.getLogger(__name__)

APP_ID = "classify-app"


class ClassifyApp(faust.App):
    """`faust.App` that logs its settings at start and consumes with `classify_app.consumer`."""

    settings: Settings

    async def on_first_start(self) -> None:
        """Called by mode once the worker's logging is set up."""
        await super().on_first_start()
        if self.settings.log_format == "json":
            use_json_logs()
        metrics.watch_gc()
        log.info("classify-app settings:\n%s", self.settings.describe())

    def _new_transport(self) -> TransportT:
        transport = LocalTransport if self.settings.is_local else Transport
        return transport(self.conf.broker_consumer, self)


def faust_options(settings: Settings) -> dict[str, Any]:
    """The `faust.App` keyword arguments for these settings."""
    options: dict[str, Any] = {
        "broker": settings.broker,
        "store": settings.store,
        "datadir": settings.datadir,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "web_bind": settings.web_bind or ("127.0.0.1" if settings.is_local else "0.0.0.0"),
        # The URL other workers use to reach this one (table routing); the pod IP on Kubernetes.
        **({"web_host": settings.web_host} if settings.web_host else {}),
        "consumer_auto_offset_reset": "earliest",
        "key_serializer": "raw",
        "value_serializer": "json",
        # One worker's stream buffer bounds memory: images wait on the broker, not in RAM.
        "stream_buffer_maxsize": 4096,
    }
    if settings.is_local:
        options.update(
            # Tansu's ListOffsets(latest) is wrong for multi-record batches: table recovery
            # would stop short of the real end of a changelog. One record per batch avoids it.
            producer_max_batch_size=1,
            # Tansu keeps topics in memory: after a broker restart the worker's RocksDB is
            # ahead of every changelog, which Faust's recovery check treats as fatal.
            recovery_consistency_check=False,
            # Tansu's group join takes about half the session timeout.
            broker_session_timeout=6,
            broker_heartbeat_interval=1,
        )
    return options


def create_app(settings: Settings) -> ClassifyApp:
    """Build the Faust app for `settings` (agents and views attach when discovered)."""
    faust_app = ClassifyApp(
        APP_ID,
        autodiscover=["agents", "tables", "classify_app.views"],
        origin="classify_app",
        **faust_options(settings),
    )
    faust_app.settings = settings
    return faust_app


def create_model_from(settings: Settings) -> ImageModel:
    """The configured model task, created but not loaded."""
    return create_model(
        settings.model,
        device=settings.device,
        precision=settings.precision,
        graph=settings.model_graph,
        top_k=settings.top_k,
        taxonomy_path=settings.taxonomy_path or None,
    )


def create_store_from(settings: Settings) -> ResultStore | None:
    """The MongoDB store of record, or None for a table-only deployment."""
    if not settings.mongo_enabled:
        return None
    return ResultStore(
        settings.mongo_uri,
        settings.mongo_database,
        settings.mongo_collection,
        timeout_s=settings.mongo_timeout_s,
    )


settings = Settings.from_env()
app = create_app(settings)
metrics = Metrics(enabled=settings.metrics)
runtime = ModelRuntime(
    create_model_from(settings),
    streams=settings.inference_threads,
    threads=settings.torch_threads,
)
store = create_store_from(settings)
store_writer: ResultWriter | None = (
    None
    if store is None
    else ResultWriter(
        store,
        capacity=settings.mongo_buffer_size,
        bulk_size=settings.mongo_bulk_size,
        migrate_on_start=settings.mongo_migrate_on_start,
        on_written=metrics.store_written,
    )
)

# The operator commands attach to `app` (last: they import this module).
from classify_app import commands  # noqa: E402, F401
