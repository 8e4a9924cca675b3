"""The MongoDB-protocol server for development and tests: SecantusDB, run as a separate
process (it is GPL-2.0 and only ever run, never imported)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from classify_app.dev.processes import free_port, stop_process


class LocalMongo:
    """A SecantusDB server on a loopback port, its data under `storage` (kept across restarts).

    `stop` and `start` again reuse the port and the data: the outage tests rely on it.
    """

    def __init__(self, storage: Path, port: int | None = None) -> None:
        self.storage = storage
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The URI for `CLASSIFY_MONGO_URI`."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers a ping."""
        executable = Path(sys.executable).with_name("secantusd-py")
        if not executable.exists():
            raise FileNotFoundError(f"no SecantusDB at {executable}; pip install SecantusDB")
        self.storage.mkdir(parents=True, exist_ok=True)
        with open(self.storage.with_suffix(".log"), "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    str(executable),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--storage-path",
                    str(self.storage),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        from pymongo import MongoClient

        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=int(timeout * 1000)
        )
        try:
            client.admin.command("ping")
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM); the data stays in `storage`."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@contextmanager
def running_mongo(storage: Path) -> Iterator[LocalMongo]:
    """A started `LocalMongo`, stopped on exit."""
    mongo = LocalMongo(storage)
    mongo.start()
    try:
        yield mongo
    finally:
        mongo.stop()
