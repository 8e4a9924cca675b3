"""classify-app: classifies the photos of classified ads as they are posted (Faust + PyTorch)."""

from classify_app.app import app

__all__ = ["app"]
