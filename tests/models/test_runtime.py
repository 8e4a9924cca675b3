"""How many cores the model runtime plans for, and how it splits them."""

from __future__ import annotations

import os
from pathlib import Path

from models import create_model
from models.runtime import ModelRuntime, available_cpus
from models.tasks import CategoryTask, TaskSet


def test_a_container_cpu_limit_caps_the_cores(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert available_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(v1) == affinity
    assert available_cpus(tmp_path / "absent") == affinity


def test_streams_and_threads_share_the_cores() -> None:
    model = TaskSet(create_model("efficientnet-lite0"), [CategoryTask()])
    explicit = ModelRuntime(model, streams=3, threads=2)
    assert (explicit.streams, explicit.threads) == (3, 2)
    default = ModelRuntime(model)
    cores = available_cpus()
    assert default.streams == min(2, cores)
    assert default.threads == max(1, cores // default.streams)
