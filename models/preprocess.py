"""Decode untrusted image bytes into RGB pictures, and shape them for a model.

Everything here is blocking and CPU-bound: callers run it in a thread, never on the event loop.
Pillow releases the GIL while it decodes and resizes, so a small thread pool scales.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from classify_app.vocabulary import ImageReason
from models.base import ImageModel

# Formats a marketplace photo can honestly be in. Restricting the decoders is the content sniff:
# an HTML page served as image/jpeg, or a PDF, never reaches a decoder.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


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
    draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode `data` into an upright RGB image, refusing anything unsafe or broken.

    The pixel limit is checked on the header, before any pixel is decoded, so a decompression
    bomb costs nothing. `draft(width, height)` gives the smallest size the caller needs; JPEGs
    are then decoded at a reduced scale (DCT scaling), which is several times faster.
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
        raise ImageRejected(ImageReason.CORRUPT_IMAGE, f"unreadable image header: {exc}") from exc

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(ImageReason.CORRUPT_IMAGE, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            ImageReason.TOO_MANY_PIXELS,
            f"{width}x{height} is {width * height} pixels, more than the limit of {max_pixels}",
        )
    try:
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft(width, height))
        # Animated images: the first frame is the photo; Image.open already points at it.
        # In place: otherwise Pillow returns a copy of every photo that needs no turning.
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(ImageReason.TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # as above: truncated or malformed data, in any plugin
        raise ImageRejected(ImageReason.CORRUPT_IMAGE, f"the image data is broken: {exc}") from exc


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
        # 16-bit and float greyscale: scale to 8 bits by the real range, not by clipping.
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8))
    return image.convert("RGB")


def short_side_draft(resize: int) -> Callable[[int, int], tuple[int, int]]:
    """A `draft` callback keeping the short side at least `resize` pixels."""

    def draft(width: int, height: int) -> tuple[int, int]:
        scale = resize / min(width, height)
        return math.ceil(width * scale), math.ceil(height * scale)

    return draft


def resize_center_crop(image: Image.Image, *, resize: int, crop: int) -> np.ndarray:
    """Resize the short side to `resize` (bicubic), centre-crop `crop` x `crop`, as uint8."""
    width, height = image.size
    scale = resize / min(width, height)
    new_size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    resized = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - crop) // 2
    top = (new_size[1] - crop) // 2
    cropped = resized.crop((left, top, left + crop, top + crop))
    return np.asarray(cropped, dtype=np.uint8)


class ImagePreparer:
    """Decodes and preprocesses image bytes for a model, in a small thread pool of its own."""

    def __init__(self, model: ImageModel, *, threads: int, max_pixels: int) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    async def prepare(self, data: bytes) -> np.ndarray:
        """Decode and preprocess off the event loop; raises `ImageRejected`."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.prepare_blocking, data
        )

    def prepare_blocking(self, data: bytes) -> np.ndarray:
        """The same, in the calling thread (for scripts and tests)."""
        image = decode_image(data, max_pixels=self.max_pixels, draft=self.model.draft_size)
        return self.model.preprocess(image)

    def close(self) -> None:
        """Stop the decode threads once the running decodes are done."""
        self._executor.shutdown(wait=False)
