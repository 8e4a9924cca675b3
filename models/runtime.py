"""Runs one model off the event loop: loading, warm-up and batched inference in one thread.

One dedicated thread keeps torch's own thread pool the only parallelism inside inference, and
keeps the asyncio loop free for downloads, Kafka and HTTP while a batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.base import ImageModel, Prediction

log = logging.getLogger(__name__)


class ModelRuntime:
    """Owns a model and the single thread it runs in.

    `start()` is awaited once by the inference stage; until it completes, `ready` is False and
    the worker reports itself not ready. If loading fails, `start()` raises and `error` says why.
    """

    def __init__(self, model: ImageModel, *, threads: int = 0) -> None:
        self.model = model
        self.threads = threads or os.cpu_count() or 1
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._loaded: asyncio.Future[None] | None = None

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        return self._loaded is not None and self._loaded.done() and not self._loaded.exception()

    def device_name(self) -> str:
        """The GPU's name (`torch.cuda.get_device_name`) when the model runs on CUDA, else "cpu"."""
        if not self.model.device.startswith("cuda"):
            return "cpu"
        import torch

        return str(torch.cuda.get_device_name(torch.device(self.model.device)))

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

    def _load_blocking(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.model.load()

    async def predict(self, images: np.ndarray) -> list[Prediction]:
        """Run one batch in the inference thread."""
        await self.start()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.model.predict_batch, images)
