"""Worker processes for the quick start, the tests and the benchmarks: their environment
against local servers, starting, waiting until ready, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

# Glibc's allocator returns memory to the OS after every forward pass and faults it back in:
# raising its thresholds doubles CPU inference throughput at batch 8-32 (see the README). One
# arena: a thread's own arena (inference runs in one) is a 64 MB heap the thresholds do not
# help, and the model ran 2.5x slower there than in the main thread (35 vs 87 images/s).
MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=134217728"
    ":glibc.malloc.arena_max=1"
)


LOOPBACK_NETS = "127.0.0.0/8,::1/128"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_environment(
    broker_url: str,
    datadir: Path,
    extra: Mapping[str, str] | None = None,
    *,
    mongo_uri: str = "",
) -> dict[str, str]:
    """The environment of a worker process against a local broker (and MongoDB server, or
    none: table-only); `CLASSIFY_*` variables of this process are not inherited, only
    `extra` ones are added."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CLASSIFY_")}
    env = {
        **inherited,
        "CLASSIFY_BROKER": broker_url,
        "CLASSIFY_MONGO_URI": mongo_uri,
        # The sample image server listens on loopback, which the downloader refuses otherwise.
        "CLASSIFY_DOWNLOAD_ALLOW_NETS": LOOPBACK_NETS,
        "CLASSIFY_PROFILE": "local",
        "CLASSIFY_DATADIR": str(datadir),
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra or {})
    return env


def start_worker(
    broker_url: str,
    datadir: Path,
    web_port: int,
    *,
    log_path: Path,
    mongo_uri: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `faust -A classify_app worker` as a child process, logging to `log_path`."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "classify_app",
                "worker",
                "--loglevel",
                "info",
                "--web-port",
                str(web_port),
                "--web-host",
                "127.0.0.1",
            ],
            env=worker_environment(broker_url, datadir, extra_env, mongo_uri=mongo_uri),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def wait_until_ready(web_url: str, timeout: float = 120.0) -> float:
    """Poll `GET /readyz` until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{web_url}/readyz") as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{web_url} was not ready within {timeout:g} s")
            await asyncio.sleep(0.2)
