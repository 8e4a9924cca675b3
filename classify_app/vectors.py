"""An embedding on the wire: float16, little-endian, in base64 (2.5 KB for Lite0's 1,280
values). The embedding task writes it into results, and the similarity index reads it back
from the vectors topic."""

from __future__ import annotations

import base64

import numpy as np


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    """The float32 vector `encode_vector` wrote."""
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float32)
