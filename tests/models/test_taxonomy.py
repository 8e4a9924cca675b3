"""The taxonomy file: complete, unambiguous, replaceable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.efficientnet import imagenet_categories
from models.taxonomy import Taxonomy, TaxonomyError


def test_default_taxonomy_covers_every_imagenet_class() -> None:
    taxonomy = Taxonomy.load(None, 1000)
    assert "other" in taxonomy.categories
    assert {"vehicles", "electronics", "furniture", "animals", "real_estate"} <= set(
        taxonomy.categories
    )
    assert len(taxonomy.class_to_category) == 1000
    assert taxonomy.matrix().sum(axis=1).tolist() == [1.0] * 1000


@pytest.mark.parametrize(
    ("label", "category"),
    [
        ("espresso", "food_drink"),
        ("tabby", "animals"),
        ("moped", "vehicles"),
        ("sports car", "vehicles"),
        ("laptop", "electronics"),
        ("studio couch", "furniture"),
        ("jean", "clothing_accessories"),
    ],
)
def test_labels_map_to_marketplace_categories(label: str, category: str) -> None:
    taxonomy = Taxonomy.load(None, 1000)
    assert taxonomy.category_of(imagenet_categories().index(label)) == category


def test_a_replacement_file_is_read_and_unlisted_classes_fall_back(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"default": "misc", "categories": {"cats": [1, 2]}}))
    taxonomy = Taxonomy.load(path, 5)
    assert taxonomy.categories == ("cats", "misc")
    assert [taxonomy.category_of(i) for i in range(5)] == ["misc", "cats", "cats", "misc", "misc"]
    probabilities = np.array([[0.1, 0.2, 0.3, 0.25, 0.15]], dtype=np.float32)
    assert (probabilities @ taxonomy.matrix()).round(3).tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize(
    "categories",
    [{"a": [1], "b": [1]}, {"a": [7]}],
    ids=["class-in-two-categories", "class-out-of-range"],
)
def test_ambiguous_or_out_of_range_mappings_are_refused(categories: dict) -> None:
    with pytest.raises(TaxonomyError):
        Taxonomy.from_mapping({"categories": categories}, 5)
