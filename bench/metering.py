"""Metering the processes a benchmark runs: RSS and CPU seconds from /proc, and a worker
started on a free port with its data and log in a folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from classify_app.dev.processes import free_port, start_worker, stop_process


class ProcessMeter:
    """RSS and CPU seconds of one process (a worker under test), from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0

    def rss_mb(self) -> float:
        """Resident memory now, in MB (and the peak seen so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
                self.peak_rss_mb = max(self.peak_rss_mb, rss)
                return rss
        return 0.0

    def pid_alive(self) -> bool:
        """Whether the process is still the one started (not exited, not a zombie)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far (every thread, ended ones too)."""
        return _stat_cpu_seconds(Path(f"/proc/{self.pid}/stat"))

    def thread_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far by kind of thread: the worker names its threads
        (`models.runtime.name_this_thread`: inference, decode, kafka-consumer); the main
        thread is the event loop; `other` is the rest (threads ended included)."""
        by_kind = dict.fromkeys(THREAD_KINDS, 0.0)
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                seconds = _stat_cpu_seconds(task / "stat")
            except OSError:  # the thread ended in between
                continue
            kind = "event loop" if task.name == str(self.pid) else name
            if kind in by_kind and kind != "other":
                by_kind[kind] += seconds
        by_kind["other"] = max(0.0, self.cpu_seconds() - sum(by_kind.values()))  # clock ticks
        return by_kind


# The worker's threads as `thread_cpu_seconds` groups them.
THREAD_KINDS = ("event loop", "inference", "decode", "kafka-consumer", "other")


def _stat_cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class MeteredWorker:
    """A worker process for a benchmark: its URL, its log, and a meter of its RSS and CPU."""

    url: str
    log_path: Path
    meter: ProcessMeter


@contextmanager
def metered_worker(
    broker_url: str,
    workdir: Path,
    *,
    mongo_uri: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[MeteredWorker]:
    """`start_worker` on a free port with its data and log in `workdir`; stopped on exit."""
    port = free_port()
    log_path = workdir / "worker.log"
    process = start_worker(
        broker_url,
        workdir / "data",
        port,
        log_path=log_path,
        mongo_uri=mongo_uri,
        extra_env=extra_env,
    )
    try:
        yield MeteredWorker(f"http://127.0.0.1:{port}", log_path, ProcessMeter(process.pid))
    finally:
        stop_process(process)
