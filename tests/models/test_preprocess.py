"""Decoding untrusted bytes: every failure has its reason, every odd image mode converts."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from classify_app.dev.images import decompression_bomb_png, sample_photo_jpeg, truncated_jpeg
from models import ImageModel
from models.preprocess import (
    ImagePreparer,
    ImageRejected,
    decode_bytes,
    decode_image,
    open_image,
    resize_center_crop,
    short_side_draft,
)
from models.tasks import TaskSet

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


def resized_whole_then_cropped(image: Image.Image, *, resize: int, crop: int) -> np.ndarray:
    """The previous preprocessing: the whole image resized, then cropped (the reference)."""
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "camera", "motorcycle", "rocket"])
def test_resizing_only_the_kept_region_keeps_the_pixels(photo: str) -> None:
    image = decode_image(sample_photo_jpeg(photo), max_pixels=MAX_PIXELS)
    kept = resize_center_crop(image, resize=256, crop=224)
    whole = resized_whole_then_cropped(image, resize=256, crop=224)
    difference = np.abs(kept.astype(int) - whole.astype(int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8


def test_labels_are_unchanged_by_resizing_only_the_kept_region(loaded_model: ImageModel) -> None:
    for photo in ["coffee", "chelsea", "camera", "motorcycle", "rocket"]:
        image = decode_image(sample_photo_jpeg(photo), max_pixels=MAX_PIXELS)
        new, old = loaded_model.predict_batch(
            np.stack(
                [
                    resize_center_crop(image, resize=256, crop=224),
                    resized_whole_then_cropped(image, resize=256, crop=224),
                ]
            )
        )
        assert new.labels[0].name == old.labels[0].name, photo
        assert abs(new.labels[0].score - old.labels[0].score) < 0.01, photo


@pytest.mark.parametrize("size", [(2000, 1), (1, 4000), (30000, 1000)])
def test_absurd_shapes_are_refused_on_the_header(size: tuple[int, int]) -> None:
    data = encode(Image.new("L", size), "PNG")
    with pytest.raises(ImageRejected) as caught:
        open_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.reason == "extreme_aspect_ratio"


def test_a_long_panorama_costs_the_output_not_the_input() -> None:
    wide = Image.new("RGB", (20_000, 1_000), (200, 30, 30))
    started = time.perf_counter()
    pixels = resize_center_crop(wide, resize=256, crop=224)
    assert pixels.shape == (224, 224, 3) and time.perf_counter() - started < 0.5
    # The old way scaled the whole 20,000 x 1,000 strip to 5,120 x 256 first.


def test_sixteen_bit_greyscale_keeps_its_range_without_a_float_copy() -> None:
    ramp = (np.arange(300 * 400, dtype=np.uint32).reshape(300, 400) % 60_000).astype(np.uint16)
    rgb = decode_image(encode(Image.fromarray(ramp), "PNG"), max_pixels=MAX_PIXELS)
    array = np.asarray(rgb)
    assert rgb.mode == "RGB" and array.min() == 0 and array.max() == 255
    expected = (ramp.astype(np.float64) - ramp.min()) * 255 / (ramp.max() - ramp.min())
    assert np.abs(array[..., 0].astype(float) - expected).max() <= 1.0


def test_decode_memory_is_budgeted_in_bytes_across_threads(loaded_model: ImageModel) -> None:
    photo = encode(Image.new("RGBA", (1000, 1000), (1, 2, 3, 4)), "PNG")
    cost = decode_bytes(open_image(photo, max_pixels=MAX_PIXELS))
    assert cost >= 1000 * 1000 * 4 * 2  # RGBA decoded, turned upright, converted
    tasks = TaskSet(loaded_model, [])
    tight = ImagePreparer(tasks, threads=2, max_pixels=MAX_PIXELS, memory_bytes=cost)
    with pytest.raises(ImageRejected) as caught:  # an image that can never fit
        ImagePreparer(
            tasks, threads=1, max_pixels=MAX_PIXELS, memory_bytes=cost - 1
        ).prepare_blocking(photo)
    assert caught.value.reason == "too_many_pixels" and "MB" in caught.value.message
    # Two threads, room for one decode: the second waits for the first to hand its bytes back.
    held = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with tight.budget.reserve(cost):
            order.append("first holds")
            held.set()
            release.wait(5)
        order.append("first done")

    def second() -> None:
        held.wait(5)
        tight.prepare_blocking(photo)
        order.append("second decoded")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    held.wait(5)
    time.sleep(0.2)
    assert order == ["first holds"]  # the second decode waits
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first holds", "first done", "second decoded"]
    assert tight.budget.available == cost
