"""The model tasks this service can run, by name.

A new task (moderation, embeddings, price prediction) is one `ImageModel` subclass added here;
the agents only ever see the `ImageModel` interface.
"""

from __future__ import annotations

from typing import Any

from models.base import ImageModel
from models.efficientnet import EfficientNetLite0

MODELS: dict[str, type[ImageModel]] = {
    EfficientNetLite0.name: EfficientNetLite0,
}


def create_model(name: str, **options: Any) -> ImageModel:
    """Create (not load) the model registered under `name`."""
    try:
        model_class = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return model_class(**options)
