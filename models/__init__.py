"""Machine learning: model registry, weights, preprocessing and batched inference.

Nothing here knows about Kafka or Faust; it runs from a plain script. Its only import from
outside is `classify_app.vocabulary`, the reason codes it raises.
"""

from models.base import ImageModel, Prediction
from models.preprocess import ImagePreparer, ImageRejected, decode_image
from models.registry import MODELS, create_model

__all__ = [
    "MODELS",
    "ImageModel",
    "ImagePreparer",
    "ImageRejected",
    "Prediction",
    "create_model",
    "decode_image",
]
