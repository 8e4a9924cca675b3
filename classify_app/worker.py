"""The composition root: the Faust app class and every part of a worker, built from `Settings`
in this one place.

`ClassifyApp` configures Faust from the settings and owns `parts` (`WorkerParts`): the metrics,
the model runtime and its batcher, the image downloader and decoder, and the MongoDB store and
its writer. The parts are built on first use, so commands that never classify (`migrate`,
`send`) never create them, and started with the worker as one `mode.Service`. Stages reach
them through `app.parts`; tests build their own `WorkerParts(Settings(...))`.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import faust
import mode
from faust.app.router import Router
from faust.types import TP, ConsumerT, TopicT

from agents.downloader import ImageDownloader
from agents.images import ImageProcessor
from classify_app.consumer import Consumer
from classify_app.kafka import (
    KafkaUnreachable,
    aiokafka_options,
    bootstrap_servers,
    check_connection,
    faust_credentials,
)
from classify_app.logs import use_json_logs
from classify_app.metrics import Metrics, WorkerCollector
from classify_app.settings import Settings
from classify_app.web.access import bearer_token_guard
from models import ImageModel, ImagePreparer, create_model
from models.batching import InferenceBatcher
from models.heads import HeadError, LinearHead
from models.runtime import ModelRuntime
from models.tasks import (
    CategoryTask,
    EmbeddingTask,
    ModelTask,
    ModerationTask,
    TaskError,
    TaskSet,
    load_task,
)
from tables.similarity import IndexFeeder, SimilarityIndex
from tables.store import ResultStore
from tables.writer import ResultWriter

log = logging.getLogger(__name__)

# Scanned by Faust's autodiscovery (the origin package, `classify_app`, is scanned too).
DISCOVERED = ["agents", "tables"]
# Never imported by a worker: development tooling, and the entry point (already running).
NOT_DISCOVERED = ["classify_app.dev", "classify_app.__main__"]
# The exit status of a worker that cannot reach Kafka with its settings (not worth a retry).
EXIT_KAFKA_UNREACHABLE = 3
# ... or that cannot make its model tasks (a head trained for another backbone, a task of
# your own that does not import).
EXIT_BAD_TASKS = 4
# What GLIBC_TUNABLES must set (the README's "Performance" measures why).
MALLOC_SETTINGS = (
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.trim_threshold",
    "glibc.malloc.arena_max",
)
# Events a stream of the worker buffers (Faust's `stream_buffer_maxsize`).
STREAM_BUFFER = 1024
# Tansu, the development broker, always waits this long in a fetch (no long polling).
LOCAL_FETCH_MAX_WAIT_MS = 50


def create_model_from(settings: Settings) -> ImageModel:
    """The configured backbone, created but not loaded."""
    return create_model(
        settings.model,
        device=settings.device,
        precision=settings.precision,
        graph=settings.model_graph,
        # The largest batch it will run, warmed up at start: its memory taken before any ad.
        warmup_batch_sizes=(1, settings.batch_max_size),
        top_k=settings.top_k,
        taxonomy_path=settings.taxonomy_path or None,
    )


def create_tasks_from(settings: Settings, backbone: ImageModel | None = None) -> TaskSet:
    """The backbone and the tasks `CLASSIFY_TASKS` lists, not loaded; raises `HeadError` for
    a head trained on another backbone and `TaskError` for a task of your own that cannot be
    made."""
    backbone = backbone or create_model_from(settings)
    head = LinearHead.load(settings.head) if settings.head else None
    if head is not None:
        head.check_backbone(backbone.name, backbone.version, getattr(backbone, "embedding_size", 0))
    built_in: dict[str, Callable[[], ModelTask]] = {
        "category": lambda: CategoryTask(head),
        "embedding": EmbeddingTask,
        "moderation": lambda: ModerationTask(settings.thresholds()),
    }
    return TaskSet(
        backbone,
        [
            built_in[name]() if name in built_in else load_task(name)
            for name in settings.task_names()
        ],
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


class WorkerParts(mode.Service):
    """What a worker classifies with, beside Faust's own services.

    Starting it loads the model in the background: a worker that cannot load its model, or
    whose model turns out broken, must not go on taking ads, so either stops the worker (its
    pod restarts), and the ads already handed over are left unacknowledged for the next one.
    Stopping it closes the HTTP session and the decode threads; the store writer's lifetime
    is its stage's.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model: ImageModel | None = None,
        peers: Callable[[], list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        """`model`: a backbone already created (tests share a loaded one); else the
        settings'. The tasks are the settings'. `peers`: the base URLs of the group's other
        workers, whose saved similarity index a start without one copies."""
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = Metrics(enabled=settings.metrics)
        self.runtime = ModelRuntime(
            create_tasks_from(settings, model),
            streams=settings.inference_threads,
            threads=settings.torch_threads,
        )
        self.batcher = InferenceBatcher(
            self.runtime,
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            timeout_s=settings.inference_timeout_s,
            on_batch=self.metrics.batch_classified,
        )
        self.downloader = ImageDownloader(settings)
        self.preparer = ImagePreparer(
            self.runtime.model,
            threads=settings.decode_threads,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
            memory_bytes=settings.decode_memory_bytes,
        )
        self.images = ImageProcessor(
            downloader=self.downloader,
            preparer=self.preparer,
            batcher=self.batcher,
            model=self.runtime.model,
            metrics=self.metrics,
            in_flight=settings.download_connections,
            in_flight_per_host=settings.download_connections_per_host,
            attempts=settings.download_attempts,
            retry_delay_s=settings.download_retry_delay_s,
        )
        # Every ad's image embeddings, from the vectors topic (`tables.similarity`).
        self.similarity: SimilarityIndex | None = None
        self.index_feeder: IndexFeeder | None = None
        if settings.similarity:
            self.similarity = SimilarityIndex(self.runtime.model.embedding_size)
            self.index_feeder = IndexFeeder(
                self.similarity,
                topic=settings.vectors_topic,
                bootstrap=bootstrap_servers(settings),
                options=aiokafka_options(settings),
                fetch_max_wait_ms=LOCAL_FETCH_MAX_WAIT_MS if settings.is_local else 500,
                save_folder=(
                    Path(settings.datadir) / "similarity" / settings.vectors_topic
                    if settings.similarity_save_s > 0
                    else None
                ),
                save_every_s=settings.similarity_save_s,
                peers=peers if settings.similarity_copy_peers else None,
                peer_headers=(
                    {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
                ),
                loop=self.loop,
                beacon=self.beacon,
            )
        self.store = create_store_from(settings)
        self.writer = (
            None
            if self.store is None
            else ResultWriter(
                self.store,
                capacity=settings.mongo_buffer_size,
                max_bytes=settings.mongo_buffer_bytes,
                bulk_size=settings.mongo_bulk_size,
                migrate_on_start=settings.mongo_migrate_on_start,
                on_written=self.metrics.store_written,
            )
        )

    def on_init_dependencies(self) -> list[mode.ServiceT]:
        """The similarity index's feeder runs with the parts."""
        return [] if self.index_feeder is None else [self.index_feeder]

    def watch(self, *, consumer_lag: Any) -> None:
        """Register the scrape-time collector of what these parts and the consumer hold."""
        writer = self.writer
        self.metrics.registry.register(
            WorkerCollector(
                lag=consumer_lag,
                images_waiting=self.batcher.waiting,
                gpu_memory=self.runtime.gpu_memory,
                store=(lambda: None) if writer is None else writer.state,
                similarity=self.similarity_state,
            )
        )

    def similarity_state(self) -> dict[str, float] | None:
        """What the similarity index holds, for `/metrics`; None when it is off."""
        if self.similarity is None or self.index_feeder is None:
            return None
        return {
            "images": len(self.similarity),
            "ads": self.similarity.ads,
            "caught_up": float(self.index_feeder.caught_up.is_set()),
        }

    @mode.Service.task
    async def _load_model(self) -> None:
        await self.runtime.start()
        if self.settings.gc_freeze:
            # Everything alive now (the model, torch, Faust) lives as long as the worker: full
            # collections need not walk it again and again.
            gc.collect()
            gc.freeze()
            log.info(
                "Froze %d long-lived objects out of the garbage collector", gc.get_freeze_count()
            )
        model = self.runtime.model
        self.metrics.model.info(
            {
                "name": model.name,
                "version": model.version,
                "device": model.device,
                "device_name": self.runtime.device_name(),
            }
        )

    @mode.Service.task
    async def _stop_when_broken(self) -> None:
        # A model that hangs or whose device keeps failing cannot be repaired from inside: the
        # worker stops (its pod restarts) and its ads are replayed by the others.
        await self.runtime.broken_event.wait()
        raise RuntimeError(f"the model is broken: {self.runtime.broken}")

    async def on_stop(self) -> None:
        """Called when the worker stops."""
        await self.downloader.close()
        self.preparer.close()


def start_up_warnings(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """What an operator must hear about at start: an open API, a slow allocator."""
    warnings = []
    bind = faust_options(settings)["web_bind"]
    if not settings.api_token and bind not in ("127.0.0.1", "::1", "localhost"):
        warnings.append(
            f"The HTTP API on {bind} is open to anyone who can reach it (results, /metrics): "
            "set CLASSIFY_API_TOKEN"
        )
    tunables = environ.get("GLIBC_TUNABLES", "")
    if sys.platform == "linux" and not all(name in tunables for name in MALLOC_SETTINGS):
        warnings.append(
            "GLIBC_TUNABLES lacks the allocator settings that make CPU inference up to 2.5x "
            f"faster ({', '.join(MALLOC_SETTINGS)}; see the README and the Dockerfile)"
        )
    return warnings


def faust_options(settings: Settings) -> dict[str, Any]:
    """The `faust.App` keyword arguments for these settings."""
    options: dict[str, Any] = {
        # Faust reads BROKER_URL, WEB_PORT, WEB_HOST and dozens more from the environment,
        # over the values given here (Kubernetes service links create such variables by
        # themselves): CLASSIFY_* is the one source of settings.
        "env": {},
        "broker": settings.broker,
        **faust_credentials(settings),
        "store": settings.store,
        "datadir": settings.datadir,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.topic_replicas,
        "table_standby_replicas": settings.table_standby_replicas,
        "producer_linger": settings.producer_linger_ms / 1000,
        "producer_max_batch_size": settings.producer_batch_size,
        **(
            {"consumer_group_instance_id": settings.group_instance_id}
            if settings.group_instance_id
            else {}
        ),
        "web_bind": settings.web_bind or ("127.0.0.1" if settings.is_local else "0.0.0.0"),
        # The URL other workers use to reach this one (table routing); the pod IP on Kubernetes.
        **({"web_host": settings.web_host} if settings.web_host else {}),
        "consumer_auto_offset_reset": "earliest",
        "key_serializer": "raw",
        "value_serializer": "json",
        # One worker's stream buffer bounds memory: images wait on the broker, not in RAM
        # (an ad event is at most CLASSIFY_MAX_EVENT_BYTES).
        "stream_buffer_maxsize": STREAM_BUFFER,
        # Records handed over per poll: few enough to fit in a stream's buffer above the mark
        # (4/5 full) where fetching its topic stops (`Consumer.on_buffer_full`). A larger poll
        # meets a full buffer and waits there with the rest of the poll: under a backlog of
        # ads, the image outcomes behind them were not read for 20 s at a time
        # (`bench/pipeline.py` shows when results arrive).
        "broker_max_poll_records": STREAM_BUFFER // 8,
        # Faust's own pages would serve table data (/table) and cluster layout (/router)
        # to anyone: off. Table routing between workers does not need them.
        "web_tables_enabled": False,
        "web_router_enabled": False,
    }
    if settings.is_local:
        options.update(
            # Tansu keeps topics in memory: after a broker restart the worker's RocksDB is
            # ahead of every changelog, which Faust's recovery check treats as fatal.
            recovery_consistency_check=False,
            # Tansu's group join takes about half the session timeout.
            broker_session_timeout=6,
            broker_heartbeat_interval=1,
        )
    return options


class RawKeyRouter(Router):
    """Faust's table router, hashing a key as the stages produce it (its raw bytes).

    Faust hashes the key as the table's changelog serializes it (JSON: `"ad-1"`), while every
    result is written in the partition its image outcome came from, which the download stage
    produced with the raw key (`ad-1`): a lookup through a worker that did not own the ad's
    partition went to the wrong worker. Whatever partitioner the marketplace's producer uses
    for `ads`, image outcomes and therefore results are partitioned by our producer."""

    @classmethod
    def _get_serialized_key(cls, table: Any, key: Any) -> bytes:
        return key if isinstance(key, bytes) else str(key).encode()


class ClassifyApp(faust.App):
    """`faust.App` configured from `Settings`, owning the worker's parts, consuming with
    `classify_app.consumer`, and logging its settings at start."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings.app_id,
            autodiscover=DISCOVERED,
            origin="classify_app",
            Router=RawKeyRouter,
            **faust_options(settings),
        )
        self.settings = settings
        self.joined_group = False  # a consumer group join completed since start
        # Called before Faust waits for the streams to acknowledge what they fetched (a
        # rebalance): each hands back work that waits on something outside the worker.
        self.before_streams_drain: list[Callable[[], Awaitable[object]]] = []
        self.declared_topics: list[TopicT] = []  # every topic of `classify_app.topics`
        self._topics_declared = False

    @functools.cached_property
    def parts(self) -> WorkerParts:
        """The worker's parts, built on first use."""
        parts = WorkerParts(self.settings, peers=self.peer_urls, loop=self.loop, beacon=self.beacon)
        parts.watch(consumer_lag=lambda: self.consumer.lag())  # type: ignore[attr-defined]
        return parts

    def peer_urls(self) -> list[str]:
        """The canonical URLs of the group's other workers, as the last assignment gave them
        (empty before the first)."""
        own = str(self.conf.canonical_url).rstrip("/")
        members = {str(url).rstrip("/") for url in self.assignor.tables_metadata()}
        return sorted(members - {own})

    async def on_first_start(self) -> None:
        """Called by mode once the worker's logging is set up."""
        await super().on_first_start()
        if self.settings.log_format == "json":
            use_json_logs()
        try:
            parts = self.parts
        except (HeadError, TaskError) as exc:
            log.critical("classify-app cannot make its model tasks: %s", exc)
            logging.shutdown()
            os._exit(EXIT_BAD_TASKS)
        parts.metrics.watch_gc()
        log.info("classify-app settings:\n%s", self.settings.describe())
        for warning in start_up_warnings(self.settings, os.environ):
            log.warning("!!! %s", warning)
        bootstrap = bootstrap_servers(self.settings)
        try:
            await check_connection(self.settings, bootstrap)
        except KafkaUnreachable as exc:
            log.critical("classify-app %s", exc)
            # Not a crash to retry: the settings are wrong. One line, and out.
            logging.shutdown()
            os._exit(EXIT_KAFKA_UNREACHABLE)

    async def on_started_init_extra_services(self) -> None:
        """Start the parts with Faust's extra services, once the tables are recovered."""
        await super().on_started_init_extra_services()
        await self.add_runtime_dependency(self.parts)

    def discover(self, *extra_modules: str, **options: Any) -> None:
        """Faust's autodiscovery, never importing what `NOT_DISCOVERED` names."""
        ignore = [*options.pop("ignore", ()), *NOT_DISCOVERED]
        super().discover(*extra_modules, ignore=ignore, **options)

    async def partition_metadata(self, topic: str) -> None:
        """Make the producer learn `topic`'s partitions: Faust routes a table key with the
        producer's partitioner, which only knows the topics it has produced to."""
        producer: Any = self.producer
        await producer._ensure_producer().partitions_for(topic)

    async def _consumer_wait_empty(self, consumer: ConsumerT, logger: Any) -> None:
        for give_back in list(self.before_streams_drain):
            await give_back()
        await super()._consumer_wait_empty(consumer, logger)

    def on_webserver_init(self, web: Any) -> None:
        """Guard every route but the probes with the API token (`classify_app.web.access`)."""
        super().on_webserver_init(web)
        web.web_app.middlewares.append(bearer_token_guard(self.settings))

    def _new_consumer(self) -> ConsumerT:
        consumer = Consumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.transport.loop,
        )
        if self.settings.is_local:
            consumer.fetch_max_wait_ms = LOCAL_FETCH_MAX_WAIT_MS
        return consumer

    async def _on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        if not self._topics_declared:
            # Faust creates the topics its agents consume; the ones this worker only writes
            # (dead letters, and `results` in a table-only deployment) must exist with the
            # configured partitions before anything is produced, not as the broker's default.
            for topic in self.declared_topics:
                await topic.maybe_declare()
            self._topics_declared = True
        await super()._on_partitions_assigned(assigned, generation_id)
        self.joined_group = True
