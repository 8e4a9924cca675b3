"""How many cores the model runtime plans for, and how it splits them."""

from __future__ import annotations

import os
from pathlib import Path

from models import create_model
from models.runtime import ModelRuntime, available_cpus


def test_a_container_cpu_limit_caps_the_cores(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cpus(limit) == min(affinity, 2)
    limit.write_text("max 100000\n")
    assert available_cpus(limit) == affinity
    assert available_cpus(tmp_path / "absent") == affinity


def test_streams_and_threads_share_the_cores() -> None:
    model = create_model("efficientnet-lite0")
    explicit = ModelRuntime(model, streams=3, threads=2)
    assert (explicit.streams, explicit.threads) == (3, 2)
    default = ModelRuntime(model)
    cores = available_cpus()
    assert default.streams == min(2, cores)
    assert default.threads == max(1, cores // default.streams)
