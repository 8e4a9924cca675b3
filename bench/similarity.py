"""Similarity: duplicate detection on the sample photos, and the nearest-neighbour index
measured against its alternatives.

    python bench/similarity.py [--sizes 100000,1000000] [--queries 200] [--engines ...]
                               [--expansions 128,256] [--skip-duplicates] [--persist N]
                               [--out FILE]

1. Duplicates (`classify_app.dev.duplicates`): the sample photos and 76 transformed copies
   (JPEG quality 50-95, resize 50-150 %, crops up to 10 %, a text watermark, mirrored, all at
   once), embedded by the worker's own model and decoding; precision and recall of the
   index's `duplicates` at several thresholds.
2. The index: N vectors of 1,280 dimensions (Lite0's embedding size), shaped as embeddings
   are (64 latent factors plus noise: neighbours are well defined), unit length. For each
   engine: insert rate, query p50/p99 (one query at a time, k=10), the process's memory
   growth, and recall@10 against exact search (a float32 brute force over the same vectors).
   Engines: usearch HNSW float16 (what the worker runs) and int8, 32 links per node, faiss
   HNSW32 (flat float32), both built with expansion 128 and searched with 64, and faiss's
   exact flat index. `--expansions` also measures each HNSW index searched with wider
   expansions (query time against recall).

3. With `--persist N`: the worker's own index at N ads, rebuilt record by record (a start
   without a save) against saved and loaded (a start with one), and the same answers after.

Prints a table and writes JSON; ratios are against faiss's exact search in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DIM = 1280
LATENT = 64
K = 10
CHUNK = 50_000
PROGRESS_EVERY = 100_000  # vectors: a long build prints its progress and saves a checkpoint


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def catalog_vectors(count: int, seed: int) -> Callable[[int, int], np.ndarray]:
    """Vectors `start..stop` of a set shaped as embeddings are (the same for every engine):
    a low intrinsic dimension (64 latent factors mapped to 1,280) plus a little noise, unit
    length, so that nearest neighbours are well defined, as they are between photos."""
    basis = np.random.default_rng(seed).normal(size=(LATENT, DIM)).astype(np.float32)

    def chunk(start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng(seed * 1_000_003 + start)
        latent = rng.normal(size=(stop - start, LATENT)).astype(np.float32)
        vectors = latent @ basis + rng.normal(scale=0.5, size=(stop - start, DIM)).astype(
            np.float32
        )
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return chunk


def exact_neighbours(chunk: Callable[[int, int], np.ndarray], count: int, queries: np.ndarray):
    """The true top-k of each query, by brute force in float32."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_keys = np.zeros((len(queries), K), dtype=np.int64)
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        scores = queries @ chunk(start, stop).T
        keys = np.broadcast_to(np.arange(start, stop), scores.shape)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_keys = np.concatenate([best_keys, keys], axis=1)
        top = np.argsort(-merged_scores, axis=1)[:, :K]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_keys = np.take_along_axis(merged_keys, top, axis=1)
    return best_keys


class Engine:
    name = ""
    expandable = False  # a graph searched with an expansion (`search_with`)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, query: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps no checkpoint")

    def load(self, path: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps no checkpoint")

    def search_with(self, expansion: int) -> None:
        """Search from now on with this expansion (candidates kept while walking the graph)."""
        raise NotImplementedError(f"{self.name} has no search expansion")


class Usearch(Engine):
    expandable = True

    def __init__(self, dtype: str) -> None:
        from usearch.index import Index

        self.name = f"usearch HNSW {dtype}"
        self.index = Index(
            ndim=DIM, metric="cos", dtype=dtype, connectivity=32, expansion_add=128,
            expansion_search=64,
        )  # fmt: skip

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(keys.astype(np.uint64), vectors)

    def search(self, query: np.ndarray) -> np.ndarray:
        return np.asarray(self.index.search(query, K).keys, dtype=np.int64)

    def save(self, path: Path) -> None:
        self.index.save(str(path))

    def load(self, path: Path) -> None:
        self.index.load(str(path))

    def search_with(self, expansion: int) -> None:
        self.index.expansion_search = expansion  # type: ignore[misc]  # it has a setter


class FaissHnsw(Engine):
    name = "faiss HNSW32 flat f32"
    expandable = True

    def __init__(self) -> None:
        import faiss

        self.index: Any = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 128
        self.index.hnsw.efSearch = 64

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(vectors)  # keys are the insertion order

    def search(self, query: np.ndarray) -> np.ndarray:
        return self.index.search(query[None, :], K)[1][0]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def load(self, path: Path) -> None:
        import faiss

        self.index = faiss.read_index(str(path))
        self.index.hnsw.efSearch = 64

    def search_with(self, expansion: int) -> None:
        self.index.hnsw.efSearch = expansion


class FaissFlat(Engine):
    name = "faiss flat f32 (exact)"

    def __init__(self) -> None:
        import faiss

        self.index = faiss.IndexFlatIP(DIM)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(vectors)

    def search(self, query: np.ndarray) -> np.ndarray:
        return self.index.search(query[None, :], K)[1][0]


ENGINES: dict[str, Callable[[], Engine]] = {
    "usearch-f16": lambda: Usearch("f16"),
    "usearch-i8": lambda: Usearch("i8"),
    "faiss-hnsw": FaissHnsw,
    "faiss-flat": FaissFlat,
}


def searched(engine: Engine, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Each query alone, timed: query p50 and p99, and recall@10 against `truth`."""
    latencies, hits = [], 0
    for query, true in zip(queries, truth, strict=True):
        started = time.perf_counter()
        found = engine.search(query)
        latencies.append(time.perf_counter() - started)
        hits += len(set(found.tolist()) & set(true.tolist()))
    latencies.sort()
    return {
        "query_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "query_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
        "recall_at_10": round(hits / (K * len(queries)), 4),
    }


def measure(
    engine_name: str,
    count: int,
    query_count: int,
    seed: int,
    checkpoints: Path | None = None,
    expansions: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One engine at `count` vectors. With `checkpoints`, a long build saves the index there
    every 100,000 vectors with the insert seconds so far, and a later run of the same engine,
    size and seed resumes from it (the build of 1,000,000 HNSW vectors takes hours here).
    `expansions`: the built index searched again with each (HNSW engines only)."""
    chunk = catalog_vectors(count, seed)
    queries = catalog_vectors(query_count, seed + 1)(0, query_count)
    truth = exact_neighbours(chunk, count, queries)
    gc.collect()
    memory_before = rss_mb()
    engine = ENGINES[engine_name]()
    insert_seconds, resumed_at, runs = 0.0, 0, 1
    progress = None
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        progress = checkpoints / f"{engine_name}-{count}-{seed}.json"
        if progress.exists():
            done = json.loads(progress.read_text())
            engine.load(checkpoints / done["index"])
            insert_seconds, resumed_at = done["insert_seconds"], done["inserted"]
            runs = done["runs"] + 1
            print(f"  {engine.name}: resumed at {resumed_at:,} vectors", flush=True)
    for start in range(resumed_at, count, CHUNK):
        stop = min(start + CHUNK, count)
        vectors = chunk(start, stop)
        started = time.perf_counter()
        engine.add(np.arange(start, stop), vectors)
        insert_seconds += time.perf_counter() - started
        del vectors
        if stop % PROGRESS_EVERY == 0 and stop < count:  # a long build shows its progress
            print(
                f"  {engine.name}: {stop:,} of {count:,} inserted, {stop / insert_seconds:,.0f} "
                f"inserts/s so far, memory +{rss_mb() - memory_before:,.0f} MB "
                f"({time.strftime('%H:%M:%S')})",
                flush=True,
            )
            if progress is not None and checkpoints is not None:
                saved = f"{progress.stem}-{stop}.index"
                engine.save(checkpoints / saved)
                state = {"index": saved, "inserted": stop, "insert_seconds": insert_seconds}
                progress.with_suffix(".tmp").write_text(json.dumps({**state, "runs": runs}))
                progress.with_suffix(".tmp").replace(progress)
                for old in checkpoints.glob(f"{progress.stem}-*.index"):
                    if old.name != saved:
                        old.unlink()
    gc.collect()
    memory = rss_mb() - memory_before
    row: dict[str, Any] = {
        "engine": engine.name,
        "vectors": count,
        "inserts_per_second": round(count / insert_seconds),
        "build_seconds": round(insert_seconds, 1),
        **searched(engine, queries, truth),
        "memory_mb": round(memory),
        **({"build_runs": runs} if runs > 1 else {}),  # resumed from a checkpoint
    }
    if expansions and engine.expandable:
        row["by_expansion"] = []
        for expansion in expansions:
            engine.search_with(expansion)
            row["by_expansion"].append({"expansion": expansion, **searched(engine, queries, truth)})
    del engine
    gc.collect()
    return row


def persistence(count: int, seed: int, batch: int) -> dict[str, Any]:
    """The worker's own index (`tables.similarity`) at `count` one-image ads: the rebuild a
    start without a save does (every record through `put_many`, `batch` at a time, as the
    feeder gets them from a fetch of the vectors topic), against saving the index and loading
    the save (what a start with one does)."""
    import tempfile

    from classify_app.records import AdVectors, ImageVector
    from classify_app.vectors import encode_vector
    from tables.similarity import SimilarityIndex

    chunk = catalog_vectors(count, seed)
    index = SimilarityIndex(DIM)
    put_seconds = 0.0
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        records = [
            AdVectors(
                ad_id=f"ad-{start + n}",
                request_id=f"r-{start + n}",
                catalog_name="c",
                version=1.0,
                submitted_at=1.0,
                images=[ImageVector(index=0, vector=encode_vector(vector))],
            )
            for n, vector in enumerate(chunk(start, stop))
        ]
        started = time.perf_counter()
        for first in range(0, len(records), batch):  # as the feeder gets them from a fetch
            index.put_many(records[first : first + batch])
        put_seconds += time.perf_counter() - started
        if stop % PROGRESS_EVERY == 0 and stop < count:
            print(
                f"  worker index: {stop:,} of {count:,} put, {stop / put_seconds:,.0f}/s",
                flush=True,
            )
    queries = catalog_vectors(20, seed + 1)(0, 20)
    before = [index.similar({0: q}, K) for q in queries]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        started = time.perf_counter()
        saved = index.save(Path(folder), {0: (count, -1)})
        save_seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in saved.iterdir())
        del index
        gc.collect()
        memory_before = rss_mb()
        loaded = SimilarityIndex(DIM)
        started = time.perf_counter()
        offsets = loaded.load(Path(folder))
        load_seconds = time.perf_counter() - started
    assert offsets == {0: (count, -1)}
    assert [loaded.similar({0: q}, K) for q in queries] == before  # the same answers
    return {
        "vectors": count,
        "records_put_together": batch,
        "rebuild_puts_per_second": round(count / put_seconds),
        "rebuild_seconds": round(put_seconds, 1),
        "save_seconds": round(save_seconds, 3),
        "saved_mb": round(size / 2**20),
        "load_seconds": round(load_seconds, 3),
        "loaded_memory_mb": round(rss_mb() - memory_before),
    }


def duplicates() -> list[dict[str, Any]]:
    from classify_app.dev.duplicates import score_duplicates
    from models import ImagePreparer, create_model
    from models.tasks import TaskSet
    from models.training import embed

    backbone = create_model("efficientnet-lite0", device="cpu")
    backbone.load()
    preparer = ImagePreparer(TaskSet(backbone, []), threads=1, max_pixels=10**8)
    cache: dict[int, np.ndarray] = {}

    def embedded(photos: list[bytes]) -> np.ndarray:
        key = hash(tuple(photos))
        if key not in cache:
            vectors = embed(backbone, preparer, photos)
            cache[key] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return cache[key]

    rows = []
    for threshold in (0.8, 0.85, 0.9, 0.95):
        row = score_duplicates(embedded, threshold)
        rows.append(row)
        print(
            f"duplicates at {threshold}: precision {row['precision']:.3f}, recall "
            f"{row['recall']:.3f} ({row['copies']} copies of {row['distinct_photos']} photos; "
            f"by transform {row['recall_by_transform']})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--expansions", default="", metavar="N,N",
        help="also search each HNSW index with these expansions (built with 128, searched "
        "with 64)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-duplicates", action="store_true")
    parser.add_argument(
        "--put-batch", type=int, default=1000, metavar="N",
        help="with --persist: records put together (the feeder's fetch; 1: one by one)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoints", type=Path, metavar="DIR",
        help="save a long build every 100,000 vectors and resume from there when run again",
    )  # fmt: skip
    parser.add_argument(
        "--persist", type=int, default=0, metavar="N",
        help="also the worker's index at N one-image ads: rebuilt from records against saved "
        "and loaded",
    )  # fmt: skip
    parser.add_argument("--out", default="bench-results/similarity.json")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    }
    if not args.skip_duplicates:
        results["duplicates"] = duplicates()
    rows = []
    expansions = tuple(int(n) for n in args.expansions.split(",") if n)
    for count in [int(n) for n in args.sizes.split(",")]:
        for name in args.engines.split(","):
            row = measure(name, count, args.queries, args.seed, args.checkpoints, expansions)
            rows.append(row)
            print(
                f"{row['engine']:24} {count:>9,}: {row['inserts_per_second']:>7,} inserts/s, "
                f"query p50 {row['query_p50_ms']:.2f} ms p99 {row['query_p99_ms']:.2f} ms, "
                f"{row['memory_mb']:,} MB, recall@10 {row['recall_at_10']:.3f}",
                flush=True,
            )
            for wider in row.get("by_expansion", []):
                print(
                    f"{'':24} {'':>9}  searched with expansion {wider['expansion']}: query p50 "
                    f"{wider['query_p50_ms']:.2f} ms p99 {wider['query_p99_ms']:.2f} ms, "
                    f"recall@10 {wider['recall_at_10']:.3f}",
                    flush=True,
                )
    for row in rows:
        exact = next(
            (r for r in rows if r["vectors"] == row["vectors"] and "exact" in r["engine"]), None
        )
        if exact is not None:
            row["query_p50_vs_exact"] = round(row["query_p50_ms"] / exact["query_p50_ms"], 3)
    results["index"] = rows
    if args.persist:
        saved = results["persistence"] = persistence(args.persist, args.seed, args.put_batch)
        print(
            f"worker index at {saved['vectors']:,}: rebuilt from records in "
            f"{saved['rebuild_seconds']:,} s ({saved['rebuild_puts_per_second']:,}/s); saved in "
            f"{saved['save_seconds']} s ({saved['saved_mb']:,} MB), loaded in "
            f"{saved['load_seconds']} s (+{saved['loaded_memory_mb']:,} MB)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
