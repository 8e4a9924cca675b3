"""Typed settings, read once from `CLASSIFY_*` environment variables.

Defaults run on a laptop. `CLASSIFY_PROFILE=local` adds the workarounds that the embedded
development broker (Tansu) needs; production (the default profile) never gets them silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from classify_app.records import EventShape

PROFILES = ("production", "local")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOG_FORMATS = ("text", "json")
BUILT_IN_TASKS = ("category", "embedding", "moderation")
# A task of your own: an importable `models.tasks.ModelTask` subclass.
TASK_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SettingsError(ValueError):
    """An environment variable could not be read as the setting it names."""


@dataclass(frozen=True)
class Settings:
    """Every knob of a worker. Field `foo_bar` is read from `CLASSIFY_FOO_BAR`."""

    profile: str = "production"
    broker: str = "kafka://localhost:9092"
    datadir: str = "classify-data"
    store: str = "rocksdb://"
    web_bind: str = ""  # empty: 127.0.0.1 for the local profile, 0.0.0.0 otherwise
    web_host: str = ""  # empty: the host name (or --web-host)
    partitions: int = 8
    replication_factor: int = 0  # 0: 3, or 1 in the local profile
    # Names the consumer group, the internal topics and the table: a second deployment (a
    # new model in shadow, a canary) with another id shares none of their state.
    app_id: str = "classify-app"
    # The ads topic belongs to the ad service: created by the worker only when asked (the
    # local profile asks).
    create_input_topic: bool = False
    # Kafka static membership (the pod's stable name): a restart does not rebalance.
    group_instance_id: str = ""
    # Copies of each table partition kept warm on other workers, for fast fail-over.
    table_standby_replicas: int = 1
    # The producer's batches: how long a record may wait for others, and their size in bytes
    # (0: aiokafka's 16 KiB, or 1 byte, a record per batch, in the local profile: the
    # development broker answers ListOffsets wrongly for multi-record batches).
    producer_linger_ms: int = 0
    producer_batch_bytes: int = 0

    # A secured cluster (`classify_app.kafka`); every `*_password`/`*_token` setting may be
    # read from a file instead: CLASSIFY_KAFKA_PASSWORD_FILE=/run/secrets/kafka-password.
    kafka_sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    kafka_username: str = ""
    kafka_password: str = ""
    kafka_tls: bool = False
    kafka_ca_file: str = ""  # empty: the system's certificate authorities
    kafka_cert_file: str = ""  # a client certificate, when the cluster asks for one
    kafka_key_file: str = ""
    kafka_key_password: str = ""
    kafka_check_hostname: bool = True

    ads_topic: str = "ads"
    results_topic: str = "results"
    dead_letter_topic: str = "ads-dead-letter"

    model: str = "efficientnet-lite0"
    device: str = "auto"
    precision: str = "auto"
    model_graph: str = "onnx"
    inference_threads: int = 0  # 0: min(2, cores)
    torch_threads: int = 0  # 0: cores / inference threads
    top_k: int = 5
    taxonomy_path: str = ""
    # The model tasks, run on one pass over each image: category, embedding, moderation, and
    # tasks of your own as module:Class (docs/tasks.md).
    tasks: str = "category"
    # A head trained with `train-head`: the marketplace's own categories instead of ImageNet's.
    head: str = ""
    # Flag an image `nsfw` from this score on; per catalog: "0.8,adult=0.97" (first: default).
    moderation_thresholds: str = "0.8"
    # Index every classified image of every ad; find duplicates, answer similarity lookups.
    similarity: bool = False
    # From this cosine similarity on, an image of an earlier ad is a duplicate.
    duplicate_threshold: float = 0.85
    # Save the similarity index to the data folder this often (and at stop), so that a restart
    # reads only the vectors topic's records after it. 0: never saved, rebuilt at each start.
    similarity_save_s: float = 600.0
    # A worker starting without a save of its own copies another worker's over HTTP (the
    # group's members, at their canonical URLs) instead of reading the whole topic.
    similarity_copy_peers: bool = True

    # 4 on the CPU: as fast as 8, and each inference stream's ONNX Runtime keeps the
    # activations of the largest batch it ran (200 MB less RSS); 32-64 on a GPU.
    batch_max_size: int = 4
    batch_max_wait_ms: int = 10
    # A batch running longer means a hung model: the worker turns unready and stops.
    inference_timeout_s: float = 60.0

    download_concurrency: int = 64
    # An ad none of whose images has its outcome this long after it was taken in is announced:
    # its result reads `pending` from then on. A quicker ad's first outcome creates its result,
    # one message and one table write fewer. 0: announce every ad at once.
    announce_after_s: float = 5.0
    # An outcome whose ad's result lives in the partition being handled, on this worker, is
    # folded into the table at once instead of crossing the outcomes topic.
    local_outcomes: bool = True
    download_connections: int = 32
    # At most this many of them to one host, so that one slow image server cannot hold all.
    download_connections_per_host: int = 8
    download_timeout_s: float = 10.0
    download_connect_timeout_s: float = 3.0
    download_max_bytes: int = 15_000_000
    download_max_redirects: int = 5
    # Comma-separated networks (CIDR) the downloader may reach besides public addresses.
    download_allow_nets: str = ""
    download_attempts: int = 3
    download_retry_delay_s: float = 1.0
    max_image_pixels: int = 50_000_000
    max_image_aspect_ratio: float = 20.0
    # Decoded pixels all decode threads may hold at once (16-bit RGBA costs 8 bytes a pixel).
    decode_memory_bytes: int = 512 * 2**20
    max_images_per_ad: int = 24
    max_event_bytes: int = 128 * 1024
    # Where the marketplace's events keep our fields (`records.EventShape`), e.g.
    # "ad_id=id,catalog_name=category.slug,images=photos[].url,updated_at=modified".
    event_fields: str = ""
    # Refuse events with fields nothing reads, instead of ignoring them (and counting them).
    strict_events: bool = False
    decode_threads: int = 2

    # When set, every route but /healthz and /readyz requires `Authorization: Bearer <token>`;
    # the read token, when set, is accepted too for GET (result lookups, /metrics).
    api_token: str = ""
    api_read_token: str = ""
    metrics: bool = True
    # gc.freeze() once the model is loaded. Off: measured here, it made full collections more
    # frequent and longer (README, "Reliability notes").
    gc_freeze: bool = False
    log_format: str = "text"

    # The store of record; an empty URI runs table-only (results live in RocksDB and Kafka).
    mongo_uri: str = "mongodb://localhost:27017"
    mongo_database: str = "classify"
    mongo_collection: str = "ad_results"
    mongo_migrate_on_start: bool = True
    mongo_buffer_size: int = 10_000
    mongo_buffer_bytes: int = 64 * 2**20
    mongo_bulk_size: int = 500
    mongo_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `CLASSIFY_*` variables, falling back to the defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = f"CLASSIFY_{field.name.upper()}"
            raw = environ.get(name)
            path = environ.get(f"{name}_FILE")
            if path is not None:
                # Kubernetes mounts a Secret as files: the value is the file's content.
                if raw is not None:
                    raise SettingsError(f"set {name} or {name}_FILE, not both")
                try:
                    raw = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
                except OSError as exc:
                    raise SettingsError(f"{name}_FILE={path!r} cannot be read: {exc}") from None
            if raw is not None:
                values[field.name] = _convert(field.name, field.type, raw.strip())
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that cannot work, with the variable's name in the message."""
        if self.profile not in PROFILES:
            raise SettingsError(f"CLASSIFY_PROFILE must be one of {PROFILES}, not {self.profile!r}")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"CLASSIFY_LOG_FORMAT must be one of {LOG_FORMATS}, not {self.log_format!r}"
            )
        for name in (
            "partitions",
            "batch_max_size",
            "download_concurrency",
            "top_k",
            "mongo_buffer_size",
            "mongo_bulk_size",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"CLASSIFY_{name.upper()} must be at least 1")
        for name in ("producer_linger_ms", "producer_batch_bytes"):
            if getattr(self, name) < 0:
                raise SettingsError(f"CLASSIFY_{name.upper()} must not be negative")
        if self.announce_after_s < 0:
            raise SettingsError("CLASSIFY_ANNOUNCE_AFTER_S must not be negative")
        listed = self.task_names()
        if (
            not listed
            or any(task not in BUILT_IN_TASKS and not TASK_PATH.match(task) for task in listed)
            or len(set(listed)) < len(listed)
        ):
            raise SettingsError(
                f"CLASSIFY_TASKS must list, once each, some of {BUILT_IN_TASKS} or tasks of "
                f"your own as module:Class, not {self.tasks!r}"
            )
        if "category" not in listed:
            raise SettingsError("CLASSIFY_TASKS must include category (results are keyed on it)")
        try:
            self.thresholds()
        except ValueError:
            raise SettingsError(
                f"CLASSIFY_MODERATION_THRESHOLDS={self.moderation_thresholds!r}: expected "
                "SCORE[,CATALOG=SCORE...] with scores between 0 and 1"
            ) from None
        if self.similarity and "embedding" not in listed:
            raise SettingsError("CLASSIFY_SIMILARITY needs the embedding task in CLASSIFY_TASKS")
        if self.similarity_save_s < 0:
            raise SettingsError("CLASSIFY_SIMILARITY_SAVE_S must not be negative")
        if not 0.0 < self.duplicate_threshold <= 1.0:
            raise SettingsError("CLASSIFY_DUPLICATE_THRESHOLD must be above 0 and at most 1")
        if self.head and not Path(self.head).is_file():
            raise SettingsError(f"CLASSIFY_HEAD={self.head!r} is not a file")
        try:
            EventShape(self.event_fields)
        except ValueError as exc:
            raise SettingsError(f"CLASSIFY_EVENT_FIELDS: {exc}") from None
        if self.kafka_sasl_mechanism and self.kafka_sasl_mechanism not in SASL_MECHANISMS:
            raise SettingsError(
                f"CLASSIFY_KAFKA_SASL_MECHANISM must be one of {SASL_MECHANISMS}, "
                f"not {self.kafka_sasl_mechanism!r}"
            )
        if self.kafka_sasl_mechanism and not (self.kafka_username and self.kafka_password):
            raise SettingsError("SASL needs CLASSIFY_KAFKA_USERNAME and CLASSIFY_KAFKA_PASSWORD")
        for name in ("kafka_ca_file", "kafka_cert_file", "kafka_key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"CLASSIFY_{name.upper()}={path!r} is not a file")
        if not self.app_id or not all(c.isalnum() or c in "-_." for c in self.app_id):
            raise SettingsError("CLASSIFY_APP_ID must be letters, digits, '-', '_' or '.'")
        if self.api_read_token and not self.api_token:
            raise SettingsError("CLASSIFY_API_READ_TOKEN needs CLASSIFY_API_TOKEN (for writes)")

    def task_names(self) -> list[str]:
        """The tasks a worker runs, in order."""
        return [task.strip() for task in self.tasks.split(",") if task.strip()]

    def thresholds(self) -> dict[str, float]:
        """Moderation thresholds by catalog; the default under ""."""
        thresholds: dict[str, float] = {}
        for number, part in enumerate(p.strip() for p in self.moderation_thresholds.split(",")):
            catalog, _, score = part.rpartition("=") if "=" in part else ("", "", part)
            # The default first, then each catalog once.
            if bool(number) != bool(catalog.strip()) or catalog.strip() in thresholds:
                raise ValueError(part)
            value = float(score)
            if not 0.0 <= value <= 1.0:
                raise ValueError(part)
            thresholds[catalog.strip()] = value
        return thresholds

    @property
    def vectors_topic(self) -> str:
        """The compacted topic of the similarity index (`tables.similarity`)."""
        return f"{self.app_id}-image-vectors"

    @property
    def topic_replicas(self) -> int:
        """The replication factor of the topics the worker creates."""
        return self.replication_factor or (1 if self.is_local else 3)

    @property
    def producer_batch_size(self) -> int:
        """The producer's largest batch in bytes."""
        return self.producer_batch_bytes or (1 if self.is_local else 16384)

    @property
    def creates_input_topic(self) -> bool:
        """Whether the worker creates the ads topic when it does not exist."""
        return self.create_input_topic or self.is_local

    @property
    def mongo_enabled(self) -> bool:
        """False for a table-only deployment (`CLASSIFY_MONGO_URI=`)."""
        return bool(self.mongo_uri)

    @property
    def is_local(self) -> bool:
        """True for the embedded development broker's profile."""
        return self.profile == "local"

    def describe(self) -> str:
        """The settings as `CLASSIFY_NAME=value` lines, for the start-up log."""
        return "\n".join(
            f"  CLASSIFY_{name.upper()}={_printable(name, value)}"
            for name, value in dataclasses.asdict(self).items()
        )


def _printable(name: str, value: Any) -> Any:
    if name.endswith(("_token", "_password")):
        return "***" if value else ""
    if name.endswith("_uri"):
        return _redact(value)
    return value


def _redact(uri: str) -> str:
    """The URI without its password, fit for a log."""
    scheme, separator, rest = uri.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not separator or not at:
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        if raw.lower() not in _BOOLEANS:
            raise SettingsError(f"CLASSIFY_{name.upper()}={raw!r} is not true/false")
        return _BOOLEANS[raw.lower()]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"CLASSIFY_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
