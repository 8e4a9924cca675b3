"""Decoding untrusted bytes: every failure has its reason, every odd image mode converts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from classify_app.dev.images import decompression_bomb_png, sample_photo_jpeg, truncated_jpeg
from models.preprocess import (
    ImageRejected,
    decode_image,
    resize_center_crop,
    short_side_draft,
)

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_jpeg_photo_decodes_to_rgb() -> None:
    image = decode_image(sample_photo_jpeg("coffee"), max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert image.size == (600, 400)


def test_draft_decodes_large_jpeg_at_reduced_scale_keeping_the_short_side() -> None:
    large = Image.new("RGB", (4000, 3000), (120, 30, 200))
    image = decode_image(encode(large, "JPEG"), max_pixels=MAX_PIXELS, draft=short_side_draft(256))
    assert min(image.size) >= 256
    assert image.size[0] <= 1000  # decoded at 1/4 scale or less, not 4000 wide


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<html><body>Not found</body></html>", "not_an_image"),
        (b"", "not_an_image"),
        (b"%PDF-1.4 not a photo", "not_an_image"),
        (truncated_jpeg(), "corrupt_image"),
        (decompression_bomb_png(), "too_many_pixels"),
    ],
    ids=["html", "empty", "pdf", "truncated-jpeg", "decompression-bomb"],
)
def test_bad_bytes_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.reason == reason
    assert caught.value.message


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (3000, 2000)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=1_000_000)
    assert caught.value.reason == "too_many_pixels"
    assert "3000x2000" in caught.value.message


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "I;16"])
def test_other_modes_convert_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new("RGB", (32, 16), (10, 200, 30)).convert(mode) if mode != "I;16" else None
    if image is None:
        image = Image.fromarray(np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16))
    decoded = decode_image(encode(image, fmt), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.size == (32, 16)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    decoded = decode_image(encode(image, "JPEG", exif=exif), max_pixels=MAX_PIXELS)
    assert decoded.size == (20, 40)


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    red, _, blue = decoded.convert("RGB").getpixel((8, 8))  # type: ignore[misc]
    assert red > 200 and blue < 50


def test_resize_center_crop_shape_and_centre() -> None:
    image = Image.new("RGB", (600, 400), (0, 0, 0))
    image.paste((255, 255, 255), (250, 150, 350, 250))
    pixels = resize_center_crop(image, resize=256, crop=224)
    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8
    assert pixels[112, 112].tolist() == [255, 255, 255]
    assert pixels[0, 0].tolist() == [0, 0, 0]
