"""classify-app: classifies the photos of classified ads as they are posted (Faust + PyTorch)."""

from classify_app import commands  # noqa: F401  (registers the CLI commands on the app)
from classify_app.app import app

__all__ = ["app"]
