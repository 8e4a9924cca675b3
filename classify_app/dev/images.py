"""Sample photos (scikit-image's) and an HTTP server of them and of the broken and hostile
answers an image downloader meets in production."""

from __future__ import annotations

import asyncio
import functools
import io
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib import resources

import numpy as np
from aiohttp import web
from PIL import Image

from classify_app.dev.processes import free_port
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


def png_of(image: Image.Image) -> bytes:
    """An image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


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
    `/bad-redirect` (a `Location` that is no URL), `/strip.png` (2000 x 1), `/deep.png`
    (30 MP of 16-bit grey in a few KB),
    `/endless` (a body that never ends, slowly), `/frames.gif` (1,000 frames). Transient
    ones: `/flaky/<key>/<failures>` answers 503 to the first `failures` requests per key,
    then the coffee photo.

    `reuse_port`: several processes may serve on the one port (`SO_REUSEPORT`; the kernel
    spreads connections among them), so that the server does not cap a benchmark.
    """

    def __init__(self, port: int | None = None, *, reuse_port: bool = False) -> None:
        self.port = port or free_port()
        self.reuse_port = reuse_port
        self._photos = {name: sample_photo_jpeg(name) for name in SAMPLE_PHOTOS}
        self._bomb = decompression_bomb_png()
        self._truncated = truncated_jpeg()
        self._frames = animated_gif(1000)
        self._strip = png_of(Image.new("L", (2000, 1), 128))  # 90 bytes, absurd shape
        # 30 MP of 16-bit grey: a few KB of PNG, 420 MB to decode naively.
        self._deep = png_of(Image.new("I;16", (6000, 5000), 40_000))
        self._flaky: dict[str, int] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8123`."""
        return f"http://127.0.0.1:{self.port}"

    def photo_url(self, name: str) -> str:
        """URL of one sample photo."""
        return f"{self.url}/photos/{name}.jpg"

    def add_photo(self, name: str, data: bytes) -> str:
        """Serve a photo of your own (a JPEG) as `/photos/<name>.jpg`; returns its URL."""
        self._photos[name] = data
        return self.photo_url(name)

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
                web.get("/bad-redirect", self._bad_redirect),
                web.get("/strip.png", self._bytes(self._strip, "image/png")),
                web.get("/deep.png", self._bytes(self._deep, "image/png")),
                web.get("/endless", self._endless),
                web.get("/frames.gif", self._bytes(self._frames, "image/gif")),
                web.get("/flaky/{key}/{failures}", self._flaky_photo),
            ]
        )
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_port=self.reuse_port)
        await site.start()

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

    async def _bad_redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://[::1"})

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
