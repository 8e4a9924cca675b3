"""Decode untrusted image bytes into RGB pictures, and shape them for a model.

Everything here is blocking and CPU-bound: callers run it in a thread, never on the event loop.
Pillow releases the GIL while it decodes and resizes, so a small thread pool scales.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from classify_app.vocabulary import ImageReason
from models.runtime import name_this_thread, release_free_memory
from models.tasks import Inputs, TaskSet

# Formats a marketplace photo can honestly be in. Restricting the decoders is the content sniff:
# an HTML page served as image/jpeg, or a PDF, never reaches a decoder.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# A decode this large hands its memory back to the OS once done.
LARGE_DECODE_BYTES = 64 * 2**20
# Panoramas and banners are at most a few times wider than high; a 2000 x 1 strip is no photo.
DEFAULT_MAX_ASPECT_RATIO = 20.0


class ImageRejected(Exception):
    """An image that cannot be classified, with a stable reason code for the result."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode `data` into an upright RGB image, refusing anything unsafe or broken
    (`open_image`, then `to_upright_rgb`; `ImagePreparer` budgets the memory in between)."""
    return to_upright_rgb(
        open_image(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio, draft=draft)
    )


def open_image(
    data: bytes,
    *,
    max_pixels: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Read the image's header only, and refuse it before any pixel is decoded if it is not an
    image, too many pixels (a decompression bomb costs nothing) or of an absurd shape.

    `draft(width, height)` gives the smallest size the caller needs; a JPEG is then set to be
    decoded at a reduced scale (DCT scaling), several times faster and smaller in memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            ImageReason.NOT_AN_IMAGE, "the content is not a supported image format"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(ImageReason.TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # Pillow's format plugins raise many kinds on hostile headers.
        raise ImageRejected(
            ImageReason.CORRUPT_IMAGE, f"unreadable image header: {_short(exc)}"
        ) from exc

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(ImageReason.CORRUPT_IMAGE, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            ImageReason.TOO_MANY_PIXELS,
            f"{width}x{height} is {width * height} pixels, more than the limit of {max_pixels}",
        )
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageRejected(
            ImageReason.EXTREME_ASPECT_RATIO,
            f"{width}x{height} is more than {max_aspect_ratio:g} times as long as it is wide",
        )
    try:
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft(width, height))
    except Exception as exc:
        raise ImageRejected(
            ImageReason.CORRUPT_IMAGE, f"unreadable image header: {_short(exc)}"
        ) from exc
    return image


# Bytes per pixel of each band, for the modes Pillow decodes into.
_BAND_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
# RGB output, plus an RGBA copy and a white background for images with transparency.
_CONVERSION_BYTES = 3 + 4 + 3


def decode_bytes(image: Image.Image) -> int:
    """An upper bound of the memory `to_upright_rgb` needs for this opened image: the decoded
    pixels (twice: turning it upright copies them) and every conversion to RGB."""
    width, height = image.size
    decoded = len(image.getbands()) * _BAND_BYTES.get(image.mode, 1)
    return width * height * (2 * decoded + _CONVERSION_BYTES)


def to_upright_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image into upright RGB; raises `ImageRejected` for broken data."""
    try:
        # Animated images: the first frame is the photo; Image.open already points at it.
        # In place: otherwise Pillow returns a copy of every photo that needs no turning.
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(ImageReason.TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # truncated or malformed data, in any plugin
        raise ImageRejected(
            ImageReason.CORRUPT_IMAGE, f"the image data is broken: {_short(exc)}"
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become white, as on a listing page."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = Image.fromarray(_to_eight_bits(np.asarray(image)))
    return image.convert("RGB")


def _to_eight_bits(array: np.ndarray, rows: int = 256) -> np.ndarray:
    """16-bit, integer or float greyscale scaled to 8 bits by its real range (not clipped),
    a band of rows at a time: no full-size float copy."""
    low, high = float(array.min()), float(array.max())
    eight = np.zeros(array.shape, dtype=np.uint8)
    if not (high > low and math.isfinite(low) and math.isfinite(high)):
        return eight
    factor = 255.0 / (high - low)
    for start in range(0, array.shape[0], rows):
        band = array[start : start + rows].astype(np.float32)
        np.nan_to_num(band, copy=False)
        eight[start : start + rows] = np.clip((band - low) * factor, 0, 255).astype(np.uint8)
    return eight


def _short(exc: BaseException) -> str:
    return str(exc)[:300]


def short_side_draft(resize: int) -> Callable[[int, int], tuple[int, int]]:
    """A `draft` callback keeping the short side at least `resize` pixels."""

    def draft(width: int, height: int) -> tuple[int, int]:
        scale = resize / min(width, height)
        return math.ceil(width * scale), math.ceil(height * scale)

    return draft


def resize_center_crop(
    image: Image.Image, *, resize: int, crop: int, reducing_gap: float | None = None
) -> np.ndarray:
    """The centre `crop` x `crop` square of the image scaled so that its short side is
    `resize` (bicubic), as uint8. Only the region kept is resized (`box`): the work and the
    memory are those of the output, whatever the image's shape. `reducing_gap` is Pillow's
    (a box reduction by an integer factor first; `bench/decode.py` measures it)."""
    width, height = image.size
    scale = resize / min(width, height)
    scaled = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    x_scale, y_scale = scaled[0] / width, scaled[1] / height
    left, top = (scaled[0] - crop) // 2, (scaled[1] - crop) // 2
    box = (left / x_scale, top / y_scale, (left + crop) / x_scale, (top + crop) / y_scale)
    resized = image.resize(
        (crop, crop), Image.Resampling.BICUBIC, box=box, reducing_gap=reducing_gap
    )
    return np.asarray(resized, np.uint8)


class DecodeBudget:
    """Bytes of decoded pixels the decode threads may hold at once, shared by all of them: a
    thread waits until the image it opened fits, and an image that never can is refused."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        """Hold `amount` bytes of the budget (blocking) while the block runs."""
        if amount > self.total:
            raise ImageRejected(
                ImageReason.TOO_MANY_PIXELS,
                f"decoding needs about {amount / 2**20:.0f} MB, more than the "
                f"{self.total / 2**20:.0f} MB of CLASSIFY_DECODE_MEMORY_BYTES",
            )
        with self._changed:
            self._changed.wait_for(lambda: self.available >= amount)
            self.available -= amount
        try:
            yield
        finally:
            with self._changed:
                self.available += amount
                self._changed.notify_all()


class ImagePreparer:
    """Decodes and preprocesses image bytes for a model, in a small thread pool of its own,
    within one memory budget for all its threads."""

    def __init__(
        self,
        model: TaskSet,
        *,
        threads: int,
        max_pixels: int,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        memory_bytes: int = 512 * 2**20,
    ) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.budget = DecodeBudget(memory_bytes)
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="decode",
            initializer=name_this_thread,
            initargs=("decode",),
        )

    async def prepare(self, data: bytes) -> Inputs:
        """Decode and preprocess off the event loop; raises `ImageRejected`."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.prepare_blocking, data
        )

    def prepare_blocking(self, data: bytes) -> Inputs:
        """The same, in the calling thread (for scripts and tests)."""
        image = open_image(
            data,
            max_pixels=self.max_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            draft=self.model.draft_size,
        )
        cost = decode_bytes(image)
        try:
            with self.budget.reserve(cost):
                return self.model.preprocess(to_upright_rgb(image))
        finally:
            if cost >= LARGE_DECODE_BYTES:
                # The allocator keeps a large decode's pages for later (its trim threshold is
                # raised for inference): give them back, or RSS climbs by steps.
                release_free_memory()

    def close(self) -> None:
        """Stop the decode threads once the running decodes are done."""
        self._executor.shutdown(wait=False)
