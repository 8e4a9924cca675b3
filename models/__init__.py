"""Machine learning: model registry, weights, preprocessing and batched inference.

Nothing here knows about Kafka or Faust; it runs from a plain script.
"""

from models.base import ImageModel, Label, Prediction
from models.preprocess import ImageRejected, decode_image
from models.registry import MODELS, create_model

__all__ = [
    "MODELS",
    "ImageModel",
    "ImageRejected",
    "Label",
    "Prediction",
    "create_model",
    "decode_image",
]
