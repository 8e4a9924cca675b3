"""classify-app: classifies the photos of classified ads as they are posted (Faust + PyTorch).

`classify_app.app` is the Faust application (`faust -A classify_app`), defined in
`classify_app/application.py` and imported on first use, so that the SDK (`classify_app.sdk`)
can be used without the worker's dependencies (torch, Faust).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from classify_app.application import app

        return app
    raise AttributeError(f"module 'classify_app' has no attribute {name!r}")
