"""Shared fixtures. Settings are read when `classify_app` is imported, so the environment for
in-process tests (Faust's `test_context()`, no broker) is set here, before any test imports it.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("CLASSIFY_STORE", "memory://")
os.environ.setdefault("CLASSIFY_DATADIR", tempfile.mkdtemp(prefix="classify-unit-"))
os.environ.setdefault("CLASSIFY_PROFILE", "local")
