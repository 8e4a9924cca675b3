"""The Faust application: `faust -A classify_app worker` imports this module.

It creates the app and nothing else; `classify_app/worker.py` says what the app is made of.
Topics (`classify_app/topics.py`) and the table (`tables/results.py`) import it; the agents,
web views and commands import those and are found by autodiscovery.
"""

from __future__ import annotations

from classify_app.settings import Settings
from classify_app.worker import ClassifyApp

app = ClassifyApp(Settings.from_env())
