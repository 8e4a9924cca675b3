"""The decode path fuzzed (hypothesis): image bytes from the corpus in `corpus/` (one small
file per format and mode a marketplace meets), mutated, truncated and with their size
fields rewritten, go through the worker's own decoder. Each comes out as the model's input
or as `ImageRejected` with a reason, never as another error, and never costs more memory than
the decode budget allows."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classify_app.vocabulary import ImageReason
from models import ImageModel, ImagePreparer, ImageRejected
from models.preprocess import decode_bytes, open_image
from models.tasks import TaskSet

CORPUS = {
    path.name: path.read_bytes() for path in sorted((Path(__file__).parent / "corpus").iterdir())
}
BUDGET = 64 * 2**20


@pytest.fixture(scope="module")
def preparer(loaded_model: ImageModel) -> ImagePreparer:
    return ImagePreparer(
        TaskSet(loaded_model, []), threads=1, max_pixels=50_000_000, memory_bytes=BUDGET
    )


def mutate(
    data: bytes, edits: list[tuple[int, int]], cut: int | None, size: tuple[int, int] | None
) -> bytes:
    """Overwrite bytes, cut the tail, and for a PNG claim another size in its header."""
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    if size is not None and buffer[:8] == b"\x89PNG\r\n\x1a\n":
        buffer[16:24] = struct.pack(">II", *size)
    if cut is not None:
        del buffer[max(8, cut % max(len(buffer), 1)) :]
    return bytes(buffer)


def check(preparer: ImagePreparer, data: bytes) -> None:
    try:
        opened = open_image(data, max_pixels=preparer.max_pixels, draft=preparer.model.draft_size)
        assert decode_bytes(opened) > 0
        pixels = preparer.prepare_blocking(data)["pixels"]
    except ImageRejected as exc:
        assert exc.reason in set(ImageReason), exc.reason
        assert exc.message
        return
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert preparer.budget.available == preparer.budget.total  # every reservation returned


def test_every_corpus_image_is_prepared(preparer: ImagePreparer) -> None:
    for name, data in CORPUS.items():
        pixels = preparer.prepare_blocking(data)["pixels"]
        assert pixels.shape == (224, 224, 3), name


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from(sorted(CORPUS)),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12),
    st.none() | st.integers(min_value=0),
    st.none()
    | st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
    | st.sampled_from([(2000, 1), (1, 4000), (65535, 65535), (30000, 1500)]),
)
def test_mutated_images_come_out_prepared_or_refused_with_a_reason(
    preparer: ImagePreparer,
    name: str,
    edits: list[tuple[int, int]],
    cut: int | None,
    size: tuple[int, int] | None,
) -> None:
    check(preparer, mutate(CORPUS[name], edits, cut, size))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_with_a_reason(preparer: ImagePreparer, data: bytes) -> None:
    check(preparer, data)
