"""Runs one model off the event loop: loading, warm-up and batched inference in its own threads.

Batches run in `streams` dedicated threads, each batch using `threads` torch threads, so the
asyncio loop stays free for downloads, Kafka and HTTP while batches run. On a small CPU, two
single-threaded streams beat one two-threaded one: a torch operator split over two threads
waits for the slower half, and beside a busy event loop one half is always late (measured on
2 cores: README, "Performance").
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.base import ImageContext, Prediction
from models.tasks import Inputs, TaskSet

log = logging.getLogger(__name__)


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup's CPU quota (a
    container's CPU limit; `os.cpu_count()` would count the whole node's cores, and torch with
    that many threads on a 2-CPU limit collapses)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    quota = _cpu_quota(cgroup)
    return count if quota is None else min(count, max(1, math.ceil(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs allowed by cgroup v2 (`cpu.max`) or v1 (`cpu/cpu.cfs_quota_us`); None: no limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def name_this_thread(name: str) -> None:
    """Name the calling OS thread (Linux's `PR_SET_NAME`, at most 15 bytes; elsewhere a no-op)
    so that `top -H`, py-spy and `/proc/PID/task/*/comm` tell the worker's threads apart and
    a benchmark can charge each its CPU time. Python's threading names only its own objects
    before Python 3.14."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


class ModelRuntime:
    """Owns a model and the threads it runs in.

    `start()` is awaited when the worker starts (and by every batch); until it completes,
    `ready` is False and the worker reports itself not ready. If loading fails, `start()`
    raises and `error` says why.
    """

    def __init__(self, model: TaskSet, *, streams: int = 0, threads: int = 0) -> None:
        cores = available_cpus()
        self.model = model
        self.streams = streams or min(2, cores)
        self.threads = threads or max(1, cores // self.streams)
        self.error: str | None = None
        self.broken: str | None = None
        self.broken_event = asyncio.Event()
        self.load_seconds: float | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=self.streams, thread_name_prefix="inference", initializer=self._init_thread
        )
        self._loaded: asyncio.Future[None] | None = None

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up, until it is found broken."""
        loaded = self._loaded is not None and self._loaded.done() and not self._loaded.exception()
        return loaded and self.broken is None

    def mark_broken(self, why: str) -> None:
        """The model cannot be trusted any more (it hangs, or its device keeps failing): the
        worker reports itself unready and stops (`broken_event`)."""
        if self.broken is None:
            self.broken = why
            self.error = why
            log.error("The model is broken: %s", why)
        self.broken_event.set()

    def device_name(self) -> str:
        """The GPU's name (`torch.cuda.get_device_name`) when the model runs on CUDA, else "cpu"."""
        if not self.model.device.startswith("cuda"):
            return "cpu"
        import torch

        return str(torch.cuda.get_device_name(torch.device(self.model.device)))

    def gpu_memory(self) -> dict[str, int] | None:
        """CUDA memory allocated, reserved and at most allocated by torch; None on the CPU."""
        if not self.ready or not self.model.device.startswith("cuda"):
            return None
        import torch

        device = torch.device(self.model.device)
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "max_allocated": torch.cuda.max_memory_allocated(device),
        }

    async def start(self) -> None:
        """Load and warm the model in the inference thread; safe to await from many places."""
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loaded)

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("Loading model %s failed", self.model.name)
            raise
        self.load_seconds = time.perf_counter() - started

    def _init_thread(self) -> None:
        import torch

        name_this_thread("inference")
        # Per thread: OpenMP keeps the thread count of each calling thread apart.
        torch.set_num_threads(self.threads)

    def _load_blocking(self) -> None:
        self.model.load()
        # Building the graph and warming up leave freed memory behind (about 50 MB); the
        # allocator's raised trim threshold would keep it for the life of the worker.
        gc.collect()
        release_free_memory()

    async def predict(
        self, inputs: Inputs, contexts: list[ImageContext]
    ) -> tuple[list[Prediction], float]:
        """Run one batch in a free inference thread (the model is safe to call from several);
        returns the predictions and the seconds the model took, timed in that thread."""
        await self.start()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed_predict, inputs, contexts)

    def _timed_predict(
        self, inputs: Inputs, contexts: list[ImageContext]
    ) -> tuple[list[Prediction], float]:
        started = time.perf_counter()
        predictions = self.model.predict_batch(inputs, contexts)
        return predictions, time.perf_counter() - started
