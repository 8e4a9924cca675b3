"""The similarity index holds the newest request of every ad and nothing else: an edit
replaces an ad's vectors, an older record never overwrites a newer one, an ad without images
leaves, and lookups never answer with the ad asked about."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classify_app.records import AdVectors, ImageVector
from classify_app.vectors import encode_vector
from tables.similarity import SimilarityIndex

DIM = 16


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def ad(
    ad_id: str, version: float, seeds: list[int], request: str = "r", first: float = 0.0
) -> AdVectors:
    return AdVectors(
        ad_id=ad_id,
        request_id=f"{request}-{version}",
        catalog_name="c",
        version=version,
        submitted_at=version,
        images=[ImageVector(index=i, vector=encode_vector(unit(s))) for i, s in enumerate(seeds)],
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


def test_an_ad_holding_a_photo_twice_is_matched_on_its_first_copy() -> None:
    """Whatever order the search returns equal pairs in, the answer is the same."""
    for seeds in ([5, 5, 5], [7, 5, 5], [5, 7, 5]):
        index = SimilarityIndex(DIM)
        index.put(ad("twice", 1.0, seeds))
        index.put(ad("query", 1.0, [5], first=1.0))
        (found,) = index.similar({0: unit(5)}, 10, exclude="query")
        assert (found.ad_id, found.image_index, found.matched_image_index) == (
            "twice",
            0,
            seeds.index(5),
        )


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


def answers(index: SimilarityIndex, ad_ids: list[str]) -> dict[str, object]:
    """Everything a lookup can see of these ads."""
    seen: dict[str, object] = {"images": len(index), "ads": index.ads}
    for ad_id in ad_ids:
        vectors = index.vectors_of(ad_id)
        seen[ad_id] = (
            index.first_posted(ad_id),
            None if vectors is None else {i: v.round(3).tolist() for i, v in vectors.items()},
            # The near ones only: which far ones an approximate search returns depends on the
            # graph, which a load and a rebuild shape differently.
            None
            if vectors is None
            else sorted(
                (n.ad_id, n.image_index, n.matched_image_index)
                for n in index.similar(vectors, 10, exclude=ad_id)
                if n.score > 0.9
            ),
        )
    return seen


RECORDS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.integers(0, 5),
        st.lists(st.integers(0, 30), max_size=3),
    ),
    max_size=20,
)


@settings(deadline=None, max_examples=40)
@given(RECORDS, RECORDS, st.integers(0, 5))
def test_a_loaded_save_then_the_records_after_it_answer_as_reading_everything(
    before: list[tuple[str, int, list[int]]],
    after: list[tuple[str, int, list[int]]],
    replayed: int,
) -> None:
    records = [
        ad(ad_id, float(version), seeds, request=f"r{number:03d}", first=float(number))
        for number, (ad_id, version, seeds) in enumerate(before + after)
    ]
    whole = SimilarityIndex(DIM)
    for record in records:
        whole.put(record)
    with tempfile.TemporaryDirectory() as folder:
        saving = SimilarityIndex(DIM)
        for record in records[: len(before)]:
            saving.put(record)
        saving.save(Path(folder), {0: (len(before), 7)})
        restarted = SimilarityIndex(DIM)
        assert restarted.load(Path(folder)) == {0: (len(before), 7)}
    # A save a little behind its offsets: the records read again change nothing.
    for record in records[max(0, len(before) - replayed) :]:
        restarted.put(record)
    ad_ids = ["a", "b", "c", "d", "e"]
    assert answers(restarted, ad_ids) == answers(whole, ad_ids)


def test_lookups_during_a_save_see_the_puts_waiting_for_it() -> None:
    index = SimilarityIndex(DIM)
    index.put(ad("orig", 1.0, [1], first=1.0))
    index.put(ad("edited", 1.0, [2], first=2.0))
    with index.holding_puts():
        index.put(ad("copy", 2.0, [1], first=3.0))
        index.put(ad("edited", 2.0, [5]))  # its photo replaced
        index.put(ad("edited", 0.5, [1]))  # an older record: not what it will hold
        assert index.first_posted("copy") == 3.0 and index.first_posted("edited") == 2.0
        later = ad("later", 1.0, [1], first=4.0)
        found = index.duplicates(later, threshold=0.99)
        assert [d.ad_id for d in found] == ["copy", "orig"]
        [near] = index.similar({0: unit(5)}, 1)
        assert near.ad_id == "edited" and near.score > 0.99
        scores = {n.ad_id: n.score for n in index.similar({0: unit(2)}, 5)}
        assert scores["edited"] < 0.9  # its old photo is not what it is found by
    assert [d.ad_id for d in index.duplicates(later, threshold=0.99)] == ["copy", "orig"]


def test_puts_held_back_during_a_save_come_after_it_in_order(tmp_path: Path) -> None:
    index = SimilarityIndex(DIM)
    index.put(ad("a", 1.0, [1]))
    with index.holding_puts():
        index.put(ad("b", 1.0, [2]))
        index.put(ad("a", 2.0, [3]))
        index.put(ad("a", 1.5, [4]))  # older than the edit before it: ignored after
        index.save(tmp_path, {0: (1, 5)})
        assert index.ads == 1  # the graph holds only "a" while the save reads it
        assert float(index.vectors_of("b")[0] @ unit(2)) > 0.99  # type: ignore[index]
        assert float(index.vectors_of("a")[0] @ unit(3)) > 0.99  # type: ignore[index]
    assert index.ads == 2
    assert float(index.vectors_of("a")[0] @ unit(3)) > 0.99  # type: ignore[index]
    loaded = SimilarityIndex(DIM)
    assert loaded.load(tmp_path) == {0: (1, 5)}
    assert loaded.ads == 1 and loaded.vectors_of("b") is None  # what the save read


def test_a_save_that_cannot_be_used_is_passed_over(tmp_path: Path) -> None:
    index = SimilarityIndex(DIM)
    assert index.load(tmp_path) is None  # none yet
    index.put(ad("a", 1.0, [1, 2]))
    first = index.save(tmp_path, {0: (1, 10), 3: (7, 20)})
    index.put(ad("b", 1.0, [3]))
    second = index.save(tmp_path, {0: (2, 30), 3: (7, 20)})
    assert not first.exists() and second.exists()  # the newest save only
    assert SimilarityIndex.saved_positions(tmp_path) == {0: (2, 30), 3: (7, 20)}
    assert SimilarityIndex(DIM + 1).load(tmp_path) is None  # another model's size
    assert SimilarityIndex(DIM, dtype="f32").load(tmp_path) is None
    held = SimilarityIndex(DIM)
    held.put(ad("z", 1.0, [9]))
    state = second / "state.jsonl"
    lines = state.read_text().splitlines()
    state.write_text("\n".join(lines[:-1]) + "\n")  # an ad short: the counts disagree
    assert held.load(tmp_path) is None
    state.write_text(lines[0][:-5] + "\n")
    assert held.load(tmp_path) is None
    (second / "index.usearch").write_bytes(b"not an index")
    state.write_text("\n".join(lines) + "\n")
    assert held.load(tmp_path) is None
    assert held.ads == 1 and held.vectors_of("z") is not None  # left as it was
    (tmp_path / "CURRENT").write_bytes(b"\xff\xfe")  # not even a name
    assert held.load(tmp_path) is None and SimilarityIndex.saved_positions(tmp_path) is None


@settings(deadline=None, max_examples=40)
@given(RECORDS, st.integers(1, 7))
def test_records_put_together_are_indexed_as_put_one_by_one(
    records: list[tuple[str, int, list[int]]], together: int
) -> None:
    made = [
        ad(ad_id, float(version), seeds, request=f"r{number:03d}", first=float(number))
        for number, (ad_id, version, seeds) in enumerate(records)
    ]
    one_by_one, batched = SimilarityIndex(DIM), SimilarityIndex(DIM)
    for record in made:
        one_by_one.put(record)
    broken = ad("x", 1.0, [1])
    broken.images[0].vector = "not base64!"
    for start in range(0, len(made), together):  # a bad record in each batch changes nothing
        assert batched.put_many([*made[start : start + together], broken]) <= together
    ad_ids = ["a", "b", "c", "d", "e", "x"]
    assert answers(batched, ad_ids) == answers(one_by_one, ad_ids)
