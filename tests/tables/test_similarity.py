"""The similarity index holds the newest request of every ad and nothing else: an edit
replaces an ad's vectors, an older record never overwrites a newer one, an ad without images
leaves, and lookups never answer with the ad asked about."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classify_app.records import AdVectors, ImageVector
from tables.similarity import SimilarityIndex

DIM = 16


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def encoded(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f2").tobytes()).decode()


def ad(
    ad_id: str, version: float, seeds: list[int], request: str = "r", first: float = 0.0
) -> AdVectors:
    return AdVectors(
        ad_id=ad_id,
        request_id=f"{request}-{version}",
        catalog_name="c",
        version=version,
        submitted_at=version,
        images=[ImageVector(index=i, vector=encoded(unit(s))) for i, s in enumerate(seeds)],
        first_submitted_at=first,
    )


def test_an_edit_replaces_the_vectors_and_an_older_record_changes_nothing() -> None:
    index = SimilarityIndex(DIM)
    assert index.put(ad("a", 1.0, [1, 2]))
    assert index.put(ad("b", 1.0, [3]))
    assert index.put(ad("a", 2.0, [4]))  # the edit: one new photo
    assert len(index) == 2 and index.ads == 2
    assert not index.put(ad("a", 1.0, [1, 2]))  # a replay of the old version
    assert list(index.vectors_of("a") or {}) == [0]
    assert float(index.vectors_of("a")[0] @ unit(4)) > 0.99  # type: ignore[index]
    [near] = index.similar({0: unit(1)}, 5, exclude="b")
    assert near.ad_id == "a" and near.score < 0.9  # photo 1 left the index with the edit
    assert index.put(ad("a", 3.0, []))  # no classified image: the ad leaves
    assert index.vectors_of("a") is None and len(index) == 1


def test_duplicates_are_earlier_ads_only_and_never_the_ad_itself() -> None:
    index = SimilarityIndex(DIM)
    index.put(ad("first", 1.0, [7, 8]))
    index.put(ad("later", 5.0, [7]))
    index.put(ad("other", 2.0, [9]))
    posted = ad("posted", 3.0, [7, 10])
    duplicates = index.duplicates(posted, threshold=0.95)
    # "later" holds the same photo but was posted after: not a duplicate of it.
    assert [(d.ad_id, d.image_index, d.matched_image_index) for d in duplicates] == [
        ("first", 0, 0)
    ]
    assert duplicates[0].score > 0.99
    index.put(posted)
    assert all(d.ad_id != "posted" for d in index.duplicates(ad("posted", 4.0, [7]), 0.5))


def test_an_original_edited_after_its_copy_stays_the_earlier_ad() -> None:
    index = SimilarityIndex(DIM)
    index.put(ad("original", 100.0, [7]))
    copy = ad("copy", 200.0, [7])
    assert [d.ad_id for d in index.duplicates(copy, 0.95)] == ["original"]
    index.put(copy)
    # The seller edits the original's price: a new request, posted after the copy.
    edited = ad("original", 300.0, [7], first=index.first_posted("original") or 0.0)
    assert index.duplicates(edited, 0.95) == []  # it is not a copy of its own copy
    index.put(edited)
    assert index.first_posted("original") == 100.0
    # Rebuilt from the topic (the newest record of each ad only), the order is kept.
    rebuilt = SimilarityIndex(DIM)
    rebuilt.put(edited)
    rebuilt.put(copy)
    assert [d.ad_id for d in rebuilt.duplicates(ad("copy", 201.0, [7]), 0.95)] == ["original"]


def test_a_bad_vector_leaves_the_ad_as_it_was() -> None:
    index = SimilarityIndex(DIM)
    index.put(ad("a", 1.0, [1]))
    broken = ad("a", 2.0, [2])
    broken.images[0].vector = "not base64!"
    with pytest.raises(ValueError):  # binascii.Error: the record is refused, and logged
        index.put(broken)
    assert index.vectors_of("a") is not None and len(index) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 5),
            st.lists(st.integers(0, 30), max_size=3),
        ),
        max_size=25,
    )
)
def test_the_index_holds_the_newest_record_of_each_ad_whatever_the_order(
    records: list[tuple[str, int, list[int]]],
) -> None:
    index = SimilarityIndex(DIM)
    newest: dict[str, tuple[tuple[int, str], list[int]]] = {}
    for number, (ad_id, version, seeds) in enumerate(records):
        request = f"r{number:03d}"  # as `request_order`: by version, then request id
        index.put(ad(ad_id, float(version), seeds, request=request))
        held = newest.get(ad_id)
        order = (version, f"{request}-{float(version)}")
        if held is None or held[0] < order:
            newest[ad_id] = (order, seeds)
    expected = {ad_id: seeds for ad_id, (_, seeds) in newest.items() if seeds}
    assert index.ads == len(expected)
    assert len(index) == sum(len(seeds) for seeds in expected.values())
    for ad_id, seeds in expected.items():
        vectors = index.vectors_of(ad_id)
        assert vectors is not None and sorted(vectors) == list(range(len(seeds)))
        for number, seed in enumerate(seeds):
            assert float(vectors[number] @ unit(seed)) > 0.99
        for neighbour in index.similar(vectors, 10, exclude=ad_id):
            assert neighbour.ad_id != ad_id and neighbour.ad_id in expected
