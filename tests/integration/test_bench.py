"""Smoke runs of the benchmarks: the scripts still work end to end and write their numbers.

They measure nothing here (CI machines vary); the numbers are in the README, measured with
the full runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "classify_app", "bench", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("CLASSIFY_")},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_model_benchmark_reports_every_batch_size(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    run = bench("model", "--", "--batch-sizes", "1,4", "--rounds", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    numbers = json.loads(out.read_text())
    assert numbers["labels_sensible"] is True
    assert [row["batch_size"] for row in numbers["batches"]] == [1, 4]
    assert all(row["images_per_second"] > 0 for row in numbers["batches"])


def test_the_pipeline_benchmark_measures_throughput_latency_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    run = bench(
        "pipeline", "--", "--ads", "20", "--warm-up", "8", "--rate", "5", "--seconds", "2",
        "--model-rounds", "2", "--env", "CLASSIFY_BATCH_MAX_SIZE=4",
        "--env", "CLASSIFY_INFERENCE_THREADS=1", "--workers", "2", "--image-processes", "2",
        "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    numbers = json.loads(out.read_text())
    assert numbers["workers"] == 2 and numbers["image_processes"] == 2
    assert numbers["worker_env"] == {
        "CLASSIFY_BATCH_MAX_SIZE": "4",
        "CLASSIFY_INFERENCE_THREADS": "1",
    }
    assert numbers["throughput"]["ads"] == 20 and numbers["throughput"]["images_per_second"] > 0
    assert numbers["throughput"]["mean_batch_size"] <= 4
    arrived = list(numbers["throughput"]["results_at_seconds"].values())
    assert 0 < arrived[0] <= arrived[-1] <= numbers["throughput"]["seconds"]
    assert arrived == sorted(arrived)
    assert numbers["latency"]["ads"] == 10 and numbers["latency"]["p50_ms"] > 0
    assert numbers["pipeline_to_bare_model"] > 0
    assert len(numbers["bare_model"]["before_and_after_images_per_second"]) == 2
    # The model's best on these cores too: a single-threaded stream per core, all at once.
    streams = numbers["bare_model_streams"]
    assert streams["streams"] == os.cpu_count() == len(streams["each_images_per_second"])
    assert numbers["pipeline_to_bare_model_streams"] > 0
    rss = numbers["worker_rss_mb"]
    assert len(rss["ready"]) == 2
    for peak, ready in zip(rss["peak"], rss["ready"], strict=True):
        assert peak >= ready > 0
    cpu = numbers["throughput"]["cpu_ms_per_image"]
    # The threads are told apart: inference and decoding ran in threads of their own.
    assert cpu["inference"] > 0 and cpu["worker_threads"]["decode"] > 0
    assert cpu["worker_threads"]["event loop"] > 0
    assert cpu["outside_model"] >= cpu["worker_outside_model"] > 0
    assert cpu["load_generator"] > 0  # the image server processes' CPU counted with it
    assert numbers["worker_device"]["device"] == "cpu"
    assert "pipeline, 20 ads" in run.stdout


def test_the_decode_benchmark_compares_ways_and_pools(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    run = bench("decode", "--", "--rounds", "1", "--pool-images", "30", "--out", str(out))
    assert run.returncode == 0, run.stderr
    numbers = json.loads(out.read_text())
    assert numbers["ways"]["pillow"]["served"]["max_pixel_difference"] == 0
    for by_kind in numbers["pools"].values():
        threads, processes = by_kind["threads"], by_kind["processes"]
        assert threads["cpu_ms_per_image_here"] == threads["cpu_ms_per_image_all"] > 0
        # With processes, the decoding is theirs: this process only moves bytes and pixels.
        assert processes["cpu_ms_per_image_all"] > processes["cpu_ms_per_image_here"] > 0
        assert threads["images_per_second"] > 0 and processes["images_per_second"] > 0


def test_the_similarity_benchmark_compares_engines_and_the_saved_index(tmp_path: Path) -> None:
    out = tmp_path / "similarity.json"
    run = bench(
        "similarity", "--", "--sizes", "600", "--queries", "20", "--engines",
        "usearch-f16,faiss-hnsw,faiss-flat", "--expansions", "10,600", "--skip-duplicates",
        "--persist", "400", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    numbers = json.loads(out.read_text())
    usearch, hnsw, exact = numbers["index"]
    assert exact["recall_at_10"] == 1.0 and 0.5 < usearch["recall_at_10"] <= 1.0
    assert usearch["query_p50_vs_exact"] > 0
    assert "by_expansion" not in exact
    for graph in (usearch, hnsw):  # the expansion changes the search: 0.77-0.83 against 0.99-1
        narrow, wide = graph["by_expansion"]
        assert (narrow["expansion"], wide["expansion"]) == (10, 600)
        assert narrow["recall_at_10"] < wide["recall_at_10"] and wide["recall_at_10"] >= 0.95
    saved = numbers["persistence"]  # the answers after loading were the same, or it failed
    assert saved["vectors"] == 400 and saved["saved_mb"] >= 0 and saved["load_seconds"] >= 0
