"""Visual similarity across every partition: an approximate nearest-neighbour index of the
embedding of every classified image of every ad, which each worker holds whole.

The source of truth is the compacted topic `<app id>-image-vectors` (key: ad id), which the
results stage writes when an ad becomes final (`AdVectors`: the newest request of an ad
replaces its vectors, no images takes the ad out). Each worker reads every partition of it
from the beginning, outside the consumer group (`IndexFeeder`), so that any worker answers a
lookup the same way whichever partitions it owns, a rebalance changes nothing, and a restart
rebuilds the index from the topic (the worker is ready once it has read what was there when
it started). The worker also puts its own ads into its index as soon as it publishes them, so
that two ads of one partition a moment apart see each other.

The index is usearch's HNSW, cosine, float16 (`bench/similarity.py` measured it against
faiss). Keys are numbers; the ad and image each stands for are kept beside it.

Rebuilding takes as long as building (minutes per 100,000 images), so the feeder saves the
index to the worker's data folder every `CLASSIFY_SIMILARITY_SAVE_S` and at stop, with the
offsets of the records it holds; a start loads the newest save and reads the topic from those
offsets. Replaying a record is harmless (`put` keeps the newest request of an ad), so a save
behind the topic only costs reading more of it; one that does not fit the topic (a topic
recreated, other settings) is dropped and the index rebuilt from the beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mode
import numpy as np

from classify_app.records import AdVectors, Duplicate
from classify_app.vectors import decode_vector
from tables.merge import request_order

log = logging.getLogger(__name__)

# The most neighbours a lookup returns.
MAX_K = 100
# What a saved index's state file starts with; a save of another layout is not read.
SAVE_FORMAT = "classify-app similarity index 1"
# Where the index stands in a partition of the vectors topic: the offset after the last record
# it holds, and that record's timestamp (-1 for none), by which a start tells that the topic
# is still the one the save read.
Position = tuple[int, int]
# The files of a save, in the order a copy fetches them, and the name of a save's folder: all
# that a copy from another worker may write.
SAVE_FILES = ("state.jsonl", "index.usearch")
SAVE_NAME = re.compile(r"saved-[0-9]{1,20}")
COPY_CHUNK_BYTES = 1 << 20
# A copy from another worker: its manifest's most bytes, the disk it leaves free, and how
# slowly it may arrive (beyond a grace period per file) before it is given up.
MAX_MANIFEST_BYTES = 64 * 1024
COPY_DISK_MARGIN_BYTES = 256 * 1024 * 1024
COPY_GRACE_S = 60.0
COPY_MIN_BYTES_PER_S = 5 * 1024 * 1024


def first_posted(vectors: AdVectors) -> float:
    """When the ad of these vectors was first posted (its first request's time)."""
    return vectors.first_submitted_at or vectors.submitted_at


def unit_vector(text: str) -> np.ndarray:
    """An embedding from the vectors topic as a unit float32 vector."""
    vector = decode_vector(text)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _newest_save(folder: Path) -> Path | None:
    """The folder of the newest save under `folder` (what CURRENT names), or None."""
    try:
        return folder / (folder / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("The similarity index saved in %s cannot be read: %r", folder, exc)
        return None


def _positions(header: dict[str, Any]) -> dict[int, Position]:
    """A save's positions, from its state file's header."""
    return {int(p): (int(at[0]), int(at[1])) for p, at in header["positions"].items()}


def _make_current(folder: Path, saved: Path) -> None:
    """Make `saved` the save `load` reads (atomically), then remove the older ones."""
    pointer = folder / "CURRENT.tmp"
    pointer.write_text(saved.name)
    pointer.replace(folder / "CURRENT")
    for old in folder.glob("saved-*"):
        if old != saved:
            shutil.rmtree(old, ignore_errors=True)


def newest_save_files(folder: Path) -> tuple[str, list[Path]] | None:
    """The newest save under `folder`: its name and its files (`SAVE_FILES`), or None."""
    saved = _newest_save(folder)
    if saved is None or not SAVE_NAME.fullmatch(saved.name):
        return None
    files = [saved / name for name in SAVE_FILES]
    return (saved.name, files) if all(path.is_file() for path in files) else None


@dataclass(frozen=True)
class Neighbour:
    """An image of another ad near the one asked about."""

    ad_id: str
    image_index: int  # the image of the ad asked about (or 0 for a photo by URL)
    matched_image_index: int  # the other ad's image
    score: float

    def as_record(self) -> dict[str, Any]:
        return {
            "ad_id": self.ad_id,
            "image_index": self.image_index,
            "matched_image_index": self.matched_image_index,
            "score": round(self.score, 5),
        }


@dataclass
class _Indexed:
    order: tuple[float, float, str]  # of the request indexed (`request_order`)
    first: float  # when the ad was first posted: what "earlier" means for duplicates
    keys: dict[int, int] = field(default_factory=dict)  # image index -> index key


class SimilarityIndex:
    """The embeddings of the newest request of every ad, searchable by cosine similarity."""

    def __init__(self, ndim: int, *, dtype: str = "f16", connectivity: int = 32) -> None:
        self.ndim = ndim
        self.dtype = dtype
        self.connectivity = connectivity
        self._index = self._new_index()
        self._ads: dict[str, _Indexed] = {}
        self._owners: dict[int, tuple[str, int]] = {}  # key -> (ad id, image index)
        self._next_key = 0
        # While a save reads the index (in a thread), puts wait here, in their order.
        self._held_back: list[AdVectors] | None = None

    def _new_index(self) -> Any:
        # PyTorch first: usearch's extension loaded before it makes the C++ exceptions that
        # TorchScript tracing relies on fail, and the model's load then spins forever.
        import torch  # noqa: F401
        from usearch.index import Index

        return Index(
            ndim=self.ndim,
            metric="cos",
            dtype=self.dtype,
            connectivity=self.connectivity,
            expansion_add=128,
            expansion_search=64,
        )

    def __len__(self) -> int:
        """Images indexed."""
        return len(self._owners)

    @property
    def ads(self) -> int:
        """Ads with an image indexed."""
        return sum(1 for entry in self._ads.values() if entry.keys)

    def put(self, vectors: AdVectors) -> bool:
        """Index the ad's vectors in place of an older request's; False (and nothing done)
        when the index holds the same or a newer request of it. Raises (and changes nothing)
        for a vector that does not decode."""
        if self._held_back is not None:
            self._held_back.append(vectors)
            return True
        return self._put_decoded([(vectors, self._images(vectors))]) == 1

    def put_many(self, records: Iterable[AdVectors]) -> int:
        """`put` each record, in order, with one insertion into the graph for them all
        (usearch spreads it over the cores: a rebuild from the topic goes faster); a record
        whose vectors do not decode is logged and passed over. Returns how many were newer
        than what the index held."""
        if self._held_back is not None:
            waiting = list(records)
            self._held_back += waiting
            return len(waiting)
        decoded = []
        for vectors in records:
            try:
                decoded.append((vectors, self._images(vectors)))
            except Exception:
                log.exception("The vectors of ad %s could not be decoded", vectors.ad_id)
        return self._put_decoded(decoded)

    def _images(self, vectors: AdVectors) -> list[tuple[int, np.ndarray]]:
        """The ad's image vectors that fit the index (unit length)."""
        images = [(image.index, unit_vector(image.vector)) for image in vectors.images]
        return [(index, vector) for index, vector in images if vector.shape == (self.ndim,)]

    def _put_decoded(self, decoded: list[tuple[AdVectors, list[tuple[int, np.ndarray]]]]) -> int:
        applied = 0
        adding: dict[int, np.ndarray] = {}  # keys given in this call, not yet in the graph
        for vectors, images in decoded:
            order = request_order(vectors)
            held = self._ads.get(vectors.ad_id)
            if held is not None and held.order >= order:
                continue
            first = first_posted(vectors)
            if held is not None:
                first = min(first, held.first)
                for key in held.keys.values():
                    if adding.pop(key, None) is None:
                        self._index.remove(key)
                    del self._owners[key]
            # An ad with no classified image is out of the index, but its request is
            # remembered: an older record arriving late must not bring its vectors back.
            entry = self._ads[vectors.ad_id] = _Indexed(order, first)
            applied += 1
            for index, vector in images:
                key, self._next_key = self._next_key, self._next_key + 1
                entry.keys[index] = key
                self._owners[key] = (vectors.ad_id, index)
                adding[key] = vector
        if adding:
            try:
                self._index.add(
                    np.fromiter(adding, dtype=np.uint64, count=len(adding)),
                    np.stack(list(adding.values())),
                )
            except BaseException:
                for key in adding:  # none of them is in the graph: nothing may name them
                    ad_id, index = self._owners.pop(key)
                    self._ads[ad_id].keys.pop(index, None)
                raise
        return applied

    def hold_puts(self) -> None:
        """While a save reads the index: puts wait (`release_puts` applies them, in order);
        lookups and `first_posted` see them meanwhile."""
        if self._held_back is None:
            self._held_back = []

    def release_puts(self) -> None:
        held, self._held_back = self._held_back or [], None
        for vectors in held:
            try:
                self.put(vectors)
            except Exception:
                log.exception("Indexing the vectors of ad %s failed", vectors.ad_id)

    @contextlib.contextmanager
    def holding_puts(self) -> Iterator[None]:
        self.hold_puts()
        try:
            yield
        finally:
            self.release_puts()

    def save(self, folder: Path, positions: dict[int, Position]) -> Path:
        """Write the index and what it holds to a new folder under `folder`, then make it the
        one `load` reads (the previous saves are removed); blocking, while puts are held.
        `positions` are the vectors topic's, per partition, up to which the index holds every
        record."""
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / f"saved-{time.time_ns()}"
        saved.mkdir()
        try:
            self._index.save(str(saved / "index.usearch"))
            with open(saved / "index.usearch", "rb") as written:
                os.fsync(written.fileno())  # on disk before CURRENT names it
            with open(saved / "state.jsonl", "w", encoding="utf-8") as state:
                header = {
                    "format": SAVE_FORMAT,
                    "ndim": self.ndim,
                    "dtype": self.dtype,
                    "connectivity": self.connectivity,
                    "ads": len(self._ads),
                    "images": len(self._owners),
                    "next_key": self._next_key,
                    "positions": {str(p): list(at) for p, at in positions.items()},
                }
                state.write(json.dumps(header) + "\n")
                for ad_id, entry in self._ads.items():
                    keys = sorted(entry.keys.items())
                    state.write(json.dumps([ad_id, list(entry.order), entry.first, keys]) + "\n")
                state.flush()
                os.fsync(state.fileno())
            _make_current(folder, saved)
        except BaseException:
            shutil.rmtree(saved, ignore_errors=True)  # a full disk must not fill up with these
            raise
        return saved

    @staticmethod
    def saved_positions(folder: Path) -> dict[int, Position] | None:
        """The positions of the newest save under `folder` (its header only), or None."""
        saved = _newest_save(folder)
        if saved is None:
            return None
        try:
            with open(saved / "state.jsonl", encoding="utf-8") as state:
                return _positions(json.loads(state.readline()))
        except Exception as exc:
            log.warning("The similarity index saved in %s cannot be read: %r", saved, exc)
            return None

    def load(self, folder: Path) -> dict[int, Position] | None:
        """Replace what the index holds by the newest save under `folder` and return its
        positions; None (and the index left as it was) when there is none or it does not fit
        these settings. Blocking, before the index is used."""
        saved = _newest_save(folder)
        if saved is None:
            return None
        try:
            with open(saved / "state.jsonl", encoding="utf-8") as state:
                header = json.loads(state.readline())
                wanted = {"ndim": self.ndim, "dtype": self.dtype, "connectivity": self.connectivity}
                if header.get("format") != SAVE_FORMAT or any(
                    header.get(name) != value for name, value in wanted.items()
                ):
                    log.warning("The similarity index saved in %s is for other settings", saved)
                    return None
                ads: dict[str, _Indexed] = {}
                owners: dict[int, tuple[str, int]] = {}
                for line in state:
                    ad_id, order, first, keys = json.loads(line)
                    entry = ads[str(ad_id)] = _Indexed(
                        (float(order[0]), float(order[1]), str(order[2])), float(first)
                    )
                    for image_index, key in keys:
                        entry.keys[int(image_index)] = int(key)
                        owners[int(key)] = (str(ad_id), int(image_index))
            index = self._new_index()
            index.load(str(saved / "index.usearch"))
            if len(index) != len(owners) or len(owners) != header["images"]:
                raise ValueError(f"{len(index)} vectors for {len(owners)} images")
            if len(ads) != header["ads"]:
                raise ValueError(f"{len(ads)} ads of {header['ads']}")
            positions = _positions(header)
            next_key = int(header["next_key"])
        except Exception as exc:
            log.warning("The similarity index saved in %s cannot be read: %r", saved, exc)
            return None
        self._index, self._ads, self._owners, self._next_key = index, ads, owners, next_key
        return positions

    def clear(self) -> None:
        """Hold nothing (a loaded save turned out not to fit the topic)."""
        self._index = self._new_index()
        self._ads, self._owners, self._next_key = {}, {}, 0

    def first_posted(self, ad_id: str) -> float | None:
        """When the ad was first posted, as far as the index knows."""
        held = self._ads.get(ad_id)
        times = [] if held is None else [held.first]
        if self._held_back and (waiting := self._newer_held_back().get(ad_id)) is not None:
            times.append(first_posted(waiting))
        return min(times, default=None)

    def vectors_of(self, ad_id: str) -> dict[int, np.ndarray] | None:
        """The indexed embeddings of an ad's images, or None for an ad not indexed; a put
        waiting for a save answers for its ad already, as it will once applied."""
        if self._held_back and (waiting := self._newer_held_back().get(ad_id)) is not None:
            try:
                return dict(self._images(waiting)) or None
            except Exception:  # it will not be applied either: the index's answer stands
                log.warning("The vectors of ad %s waiting for a save do not decode", ad_id)
        held = self._ads.get(ad_id)
        if held is None or not held.keys:
            return None
        return {
            index: np.asarray(self._index.get(key), dtype=np.float32)
            for index, key in held.keys.items()
        }

    def similar(
        self,
        vectors: dict[int, np.ndarray],
        k: int,
        *,
        exclude: str | None = None,
        before: tuple[float, str] | None = None,
        threshold: float = -1.0,
    ) -> list[Neighbour]:
        """The `k` other ads nearest to any of these images, best first, each with its best
        pair of images; `exclude` leaves an ad out (the one asked about), `before` keeps the
        ads first posted earlier (`(time, ad id)`), `threshold` the scores from it on."""
        best: dict[str, Neighbour] = {}

        def rank(neighbour: Neighbour) -> tuple[float, int, int]:
            # Equal scores (an ad holding the same photo twice) go to the first pair, not to
            # whichever the search graph happened to return first.
            return (-neighbour.score, neighbour.image_index, neighbour.matched_image_index)

        for image_index, vector in vectors.items():
            for neighbour in self._search(vector, k, exclude, before, image_index):
                if neighbour.score < threshold:
                    continue
                held = best.get(neighbour.ad_id)
                if held is None or rank(neighbour) < rank(held):
                    best[neighbour.ad_id] = neighbour
        return sorted(best.values(), key=lambda n: (-n.score, n.ad_id))[:k]

    def duplicates(self, vectors: AdVectors, threshold: float, k: int = 10) -> list[Duplicate]:
        """Images of earlier ads (first posted before this one, whatever their edits since)
        that the ad's images nearly repeat: every pair at or above `threshold`, the ad itself
        (and its earlier versions) left out."""
        known = self.first_posted(vectors.ad_id)
        first = first_posted(vectors) if known is None else min(known, first_posted(vectors))
        order = (first, vectors.ad_id)
        found = []
        for image in vectors.images:
            vector = unit_vector(image.vector)
            if vector.shape != (self.ndim,):
                continue
            for neighbour in self._search(vector, k, vectors.ad_id, order, image.index):
                if neighbour.score >= threshold:
                    found.append(
                        Duplicate(
                            ad_id=neighbour.ad_id,
                            image_index=image.index,
                            matched_image_index=neighbour.matched_image_index,
                            score=round(neighbour.score, 5),
                        )
                    )
        return sorted(found, key=lambda d: (d.image_index, -d.score, d.ad_id))

    def _search(
        self,
        vector: np.ndarray,
        k: int,
        exclude: str | None,
        before: tuple[float, str] | None,
        image_index: int,
    ) -> Iterable[Neighbour]:
        waiting = self._newer_held_back()
        found = []
        if self._owners:
            # Ask for more than k: the excluded ad's own images and later ads are left out.
            own = len(self._ads[exclude].keys) if exclude in self._ads else 0
            wanted = min(len(self._owners), k * 2 + 16 + own)
            matches = self._index.search(vector, wanted)
            for key, distance in zip(
                matches.keys.tolist(), matches.distances.tolist(), strict=True
            ):
                owner = self._owners.get(int(key))
                if owner is None or owner[0] == exclude or owner[0] in waiting:
                    continue
                if before is not None and (self._ads[owner[0]].first, owner[0]) >= before:
                    continue
                found.append(Neighbour(owner[0], image_index, owner[1], 1.0 - float(distance)))
        for ad_id, held in waiting.items():  # the few puts waiting for a save, one by one
            first = self.first_posted(ad_id) or first_posted(held)
            if ad_id == exclude or (before is not None and (first, ad_id) >= before):
                continue
            for image in held.images:
                other = unit_vector(image.vector)
                if other.shape == vector.shape:
                    score = float(other @ vector)
                    found.append(Neighbour(ad_id, image_index, image.index, score))
        return found

    def _newer_held_back(self) -> dict[str, AdVectors]:
        """The held-back puts that will replace what the index holds of their ads."""
        newer: dict[str, AdVectors] = {}
        for vectors in self._held_back or ():
            held = newer.get(vectors.ad_id)
            indexed = self._ads.get(vectors.ad_id)
            if (held is None or request_order(vectors) > request_order(held)) and (
                indexed is None or request_order(vectors) > indexed.order
            ):
                newer[vectors.ad_id] = vectors
        return newer


class _SaveReplaced(Exception):
    """The peer made a newer save while this one was copied: its manifest is asked again."""


async def _fetch_save(session: Any, peer: str, incoming: Path) -> int | None:
    """Download the newest save of the worker at `peer` into the new folder `incoming`;
    its size in bytes, or None when the worker has none (or has similarity off). Raises
    when the copy fails or is not what the worker announced (`_SaveReplaced` when a newer
    save took its place meanwhile)."""
    loop = asyncio.get_running_loop()
    async with session.get(f"{peer}/classify/similarity/save") as response:
        if response.status in (404, 501):
            return None
        response.raise_for_status()
        body = await response.content.read(MAX_MANIFEST_BYTES + 1)
    if len(body) > MAX_MANIFEST_BYTES:
        raise ValueError(f"a manifest of more than {MAX_MANIFEST_BYTES} bytes")
    manifest = json.loads(body)
    name = str(manifest["save"])
    sizes = {str(file["name"]): int(file["bytes"]) for file in manifest["files"]}
    named = SAVE_NAME.fullmatch(name) and sorted(sizes) == sorted(SAVE_FILES)
    if not named or any(size < 0 for size in sizes.values()):
        raise ValueError(f"not a save: {manifest!r:.200}")
    incoming.mkdir(parents=True)
    # What the copy may take of the disk the tables share: all but a margin.
    free = shutil.disk_usage(incoming).free
    if sum(sizes.values()) + COPY_DISK_MARGIN_BYTES > free:
        raise ValueError(f"{sum(sizes.values())} bytes announced, {free} free on the disk")
    for file in SAVE_FILES:
        size = sizes[file]
        # However slowly a peer sends, the copy ends: at least COPY_MIN_BYTES_PER_S.
        async with asyncio.timeout(COPY_GRACE_S + size / COPY_MIN_BYTES_PER_S):
            url = f"{peer}/classify/similarity/save/{name}/{file}"
            async with session.get(url) as response:
                if response.status == 404:
                    raise _SaveReplaced(f"{file} of {name} is gone")
                response.raise_for_status()
                with open(incoming / file, "wb") as out:
                    written = 0
                    async for chunk in response.content.iter_chunked(COPY_CHUNK_BYTES):
                        written += len(chunk)
                        if written > size:
                            raise ValueError(f"{file} is longer than the {size} bytes announced")
                        await loop.run_in_executor(None, out.write, chunk)
                    if written != size:
                        raise ValueError(f"{file}: {written} of the {size} bytes announced")
                    await loop.run_in_executor(None, os.fsync, out.fileno())
    return sum(sizes.values())


class IndexFeeder(mode.Service):
    """Reads every partition of the vectors topic into the index, from the beginning (or
    from a saved index's offsets) and for as long as the worker runs; `caught_up` is set
    once it has read up to where the topic ended when it started."""

    def __init__(
        self,
        index: SimilarityIndex,
        *,
        topic: str,
        bootstrap: str,
        options: dict[str, Any],
        fetch_max_wait_ms: int = 500,
        save_folder: Path | None = None,
        save_every_s: float = 0.0,
        peers: Callable[[], list[str]] | None = None,
        peer_headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """`fetch_max_wait_ms` bounds how soon another worker's ad is seen (on a broker
        without long polls, such as Tansu, it is also how often the feeder asks). With a
        `save_folder`, the index is saved there every `save_every_s` (if above 0) and at
        stop, and loaded from there at start; with `peers` too (the base URLs of the other
        workers), a start without a save of its own copies one of theirs
        (`GET /classify/similarity/save`, with `peer_headers`) before reading the topic."""
        super().__init__(**kwargs)
        self.peers = peers
        self.peer_headers = peer_headers or {}
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.index = index
        self.topic = topic
        self.bootstrap = bootstrap
        self.options = options
        self.save_folder = save_folder
        self.save_every_s = save_every_s
        self.caught_up = asyncio.Event()
        self.records = 0
        self.started_at = 0.0
        self.caught_up_seconds: float | None = None
        self._consumer: Any = None
        # Per partition, the offset after the last record the index holds.
        self._applied: dict[int, Position] = {}
        self._saving = asyncio.Lock()
        self._saved_at = 0.0
        self._changed = False  # records applied since the last save (or the load)

    @mode.Service.task
    async def _feed(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            **self.options,
        )
        self._consumer = consumer
        await consumer.start()
        try:
            partitions: set[int] = set()
            while not partitions:  # the worker creates the topic when it joins its group
                if self.topic in await consumer.topics():  # a metadata request
                    partitions = consumer.partitions_for_topic(self.topic) or set()
                if not partitions:
                    await asyncio.sleep(0.5)
            assigned = [TopicPartition(self.topic, number) for number in sorted(partitions)]
            consumer.assign(assigned)
            ends = await consumer.end_offsets(assigned)
            await self._start_from(consumer, ends)
            waiting = {tp: end for tp, end in ends.items() if end > 0}
            await self._check_caught_up(consumer, waiting, loop.time())
            self._saved_at = loop.time()
            while not self.should_stop:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for tp, records in batches.items():
                    self._apply([record.value for record in records])
                    last = records[-1]
                    self._applied[tp.partition] = (last.offset + 1, last.timestamp)
                await self._check_caught_up(consumer, waiting, loop.time())
                if self.save_every_s > 0 and loop.time() - self._saved_at >= self.save_every_s:
                    await self.save()
        finally:
            await consumer.stop()

    async def _start_from(self, consumer: Any, ends: dict[Any, int]) -> None:
        """Seek every partition: to a saved index's positions when one loads and fits the
        topic, else to the beginning."""
        loop = asyncio.get_running_loop()
        positions = None
        if self.save_folder is not None:
            started = loop.time()
            for old in self.save_folder.glob("incoming-*"):  # a copy cut short by a crash
                shutil.rmtree(old, ignore_errors=True)
            saved = SimilarityIndex.saved_positions(self.save_folder)
            # Nothing of its own and a topic to read: another worker's save is much quicker.
            if saved is None and any(ends.values()) and await self._copy_from_peer():
                saved = SimilarityIndex.saved_positions(self.save_folder)
                # The peer may have saved after `ends` were read: they are read again, or
                # the save would look longer than the topic.
                ends.update(await consumer.end_offsets(list(ends)))
            why = None if saved is None else await self._misfit(consumer, saved, ends)
            if why is not None:
                log.warning("The saved similarity index is not for %s (%s): rebuilding it "
                            "from the topic", self.topic, why)  # fmt: skip
            elif saved is not None:
                positions = await loop.run_in_executor(None, self.index.load, self.save_folder)
            if positions is not None:
                log.info(
                    "Similarity index loaded from %s: %d images of %d ads in %.1f s; "
                    "reading %s from where it was saved",
                    self.save_folder,
                    len(self.index),
                    self.index.ads,
                    loop.time() - started,
                    self.topic,
                )
        if positions is None:
            await consumer.seek_to_beginning(*ends)
            return
        for tp in ends:
            if tp.partition in positions:
                consumer.seek(tp, positions[tp.partition][0])
                self._applied[tp.partition] = positions[tp.partition]
            else:
                await consumer.seek_to_beginning(tp)

    async def _copy_from_peer(self) -> bool:
        """Copy the newest save of another worker that has one into `save_folder`: a worker
        without a save (new, or its volume lost) then loads it and reads only the records
        after it, instead of inserting the whole topic (hours at a million images). False
        when there are no peers or no copy succeeded; nothing half-copied is left."""
        import aiohttp

        folder, peers = self.save_folder, self.peers
        if folder is None or peers is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            listed = peers()
        except Exception:
            log.exception("The other workers' addresses are not known")
            return False
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)  # and per file
        async with aiohttp.ClientSession(headers=self.peer_headers, timeout=timeout) as session:
            for peer in random.sample(listed, len(listed)):  # new workers spread over the old
                for attempt in (1, 2):  # again once when a newer save replaced the one asked
                    started = loop.time()
                    incoming = folder / f"incoming-{time.time_ns()}"
                    try:
                        copied = await _fetch_save(session, peer.rstrip("/"), incoming)
                        if copied is not None:
                            saved = incoming.rename(folder / f"saved-{time.time_ns()}")
                            _make_current(folder, saved)
                    except Exception as exc:
                        if isinstance(exc, _SaveReplaced) and attempt == 1:
                            continue
                        log.warning("Copying the similarity index of %s failed: %r", peer, exc)
                        copied = None
                    finally:
                        shutil.rmtree(incoming, ignore_errors=True)  # renamed when it succeeded
                    if copied is not None:
                        log.info(
                            "Similarity index copied from %s: %.0f MB in %.1f s",
                            peer,
                            copied / 1e6,
                            loop.time() - started,
                        )
                        return True
                    break
        return False

    async def _misfit(
        self, consumer: Any, saved: dict[int, Position], ends: dict[Any, int]
    ) -> str | None:
        """Why a save does not fit the topic as it is now (None when it does): it read a
        partition the topic lacks, or more records than a partition holds, or the last record
        it read is not there any more (the topic was recreated under the same name)."""
        partitions = {tp.partition: tp for tp in ends}
        for partition, (offset, timestamp) in sorted(saved.items()):
            tp = partitions.get(partition)
            if tp is None:
                return f"partition {partition} is gone"
            if offset > ends[tp]:
                return f"partition {partition} ends at {ends[tp]}, the save read {offset}"
            if offset == 0:
                continue
            consumer.seek(tp, offset - 1)
            fetched = await consumer.getmany(tp, timeout_ms=5000, max_records=1)
            last = fetched.get(tp) or [None]
            if last[0] is None or (last[0].offset, last[0].timestamp) != (offset - 1, timestamp):
                return f"the record at offset {offset - 1} of partition {partition} changed"
        return None

    async def save(self) -> None:
        """Save the index to `save_folder` (in a thread: puts wait meanwhile), unless
        nothing changed since the last save or load."""
        async with self._saving:
            if self.save_folder is None or not self._changed:
                return
            loop = asyncio.get_running_loop()
            started = loop.time()
            positions = dict(self._applied)  # at once with holding puts: no record in between
            self._changed = False
            self.index.hold_puts()
            saving = loop.run_in_executor(None, self.index.save, self.save_folder, positions)
            # Released when the thread is done reading the index, even if this is cancelled.
            saving.add_done_callback(lambda _: self.index.release_puts())
            try:
                saved = await asyncio.shield(saving)
            except Exception:
                self._changed = True
                log.exception("Saving the similarity index to %s failed", self.save_folder)
                return
            finally:
                self._saved_at = loop.time()
            log.info(
                "Similarity index saved to %s: %d images in %.1f s",
                saved,
                len(self.index),
                loop.time() - started,
            )

    async def on_stop(self) -> None:
        """Save the index before the feeder stops reading."""
        await self.save()

    def _apply(self, values: list[bytes | None]) -> None:
        """One fetch's records of a partition into the index. A bad record must not stop the
        index: it is logged and passed over."""
        self.records += len(values)
        self._changed = True
        records = []
        for value in values:
            if not value:
                continue
            try:
                records.append(AdVectors.loads(value, serializer="json"))
            except Exception:
                log.exception("A record of %s could not be read", self.topic)
        try:
            self.index.put_many(records)
        except Exception:
            log.exception("Indexing %d records of %s failed", len(records), self.topic)

    async def _check_caught_up(self, consumer: Any, waiting: dict[Any, int], now: float) -> None:
        if self.caught_up.is_set():
            return
        for tp in list(waiting):
            if await consumer.position(tp) >= waiting[tp]:
                del waiting[tp]
        if not waiting:
            self.caught_up_seconds = round(now - self.started_at, 3)
            log.info(
                "Similarity index caught up: %d images of %d ads from %d records in %.1f s",
                len(self.index),
                self.index.ads,
                self.records,
                self.caught_up_seconds,
            )
            self.caught_up.set()
