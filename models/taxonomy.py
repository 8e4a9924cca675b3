"""The mapping from a model's raw classes to the marketplace's categories.

The mapping is a data file (`models/data/taxonomy.json` by default) that a marketplace replaces
with its own: `{"default": "other", "categories": {"vehicles": [class indices], ...}}`.
A category's score for an image is the total probability of the classes mapped to it, so
"espresso 60 % + cup 30 %" adds up for the category that holds both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_TAXONOMY = "taxonomy.json"


class TaxonomyError(ValueError):
    """The taxonomy file does not describe a complete, unambiguous mapping."""


@dataclass(frozen=True)
class Taxonomy:
    """Categories and, for each raw class index, the category it belongs to."""

    categories: tuple[str, ...]
    class_to_category: tuple[int, ...]
    version: str

    @classmethod
    def load(cls, path: str | Path | None, num_classes: int) -> Taxonomy:
        """Read a taxonomy file; `None` reads the one shipped with the package."""
        if path is None:
            text = resources.files("models").joinpath("data", DEFAULT_TAXONOMY).read_text()
            origin = f"models/data/{DEFAULT_TAXONOMY}"
        else:
            text = Path(path).read_text()
            origin = str(path)
        return cls.from_mapping(json.loads(text), num_classes, origin=origin)

    @classmethod
    def from_mapping(cls, data: dict, num_classes: int, *, origin: str = "<mapping>") -> Taxonomy:
        """Build a taxonomy from the parsed file; unlisted classes go to `default`."""
        default = data.get("default", "other")
        categories: dict[str, list[int]] = data.get("categories", {})
        names = tuple(dict.fromkeys([*categories, default]))
        assignment = [-1] * num_classes
        for position, name in enumerate(names):
            for index in categories.get(name, []):
                if not 0 <= index < num_classes:
                    raise TaxonomyError(f"{origin}: class {index} of {name!r} is out of range")
                if assignment[index] != -1:
                    raise TaxonomyError(
                        f"{origin}: class {index} is in both {names[assignment[index]]!r} "
                        f"and {name!r}"
                    )
                assignment[index] = position
        fallback = names.index(default)
        mapped = tuple(fallback if position == -1 else position for position in assignment)
        return cls(categories=names, class_to_category=mapped, version=str(data.get("version", "")))

    def matrix(self) -> np.ndarray:
        """A (classes x categories) 0/1 matrix: probabilities @ matrix = category scores."""
        matrix = np.zeros((len(self.class_to_category), len(self.categories)), dtype=np.float32)
        matrix[np.arange(len(self.class_to_category)), self.class_to_category] = 1.0
        return matrix

    def category_of(self, class_index: int) -> str:
        """The category one raw class maps to."""
        return self.categories[self.class_to_category[class_index]]
