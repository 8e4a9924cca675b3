"""The commands of classify-app's command line, next to Faust's own, found by autodiscovery:
`faust -A classify_app <command> --help` (or `python -m classify_app <command> --help`).

`operations` (migrate, dlq-replay) are for operators, `submit` (send, send-file, result) talks
to a running worker through the SDK, `local` (classify-image, bench) runs here without one.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from faust.cli import AppCommand

from classify_app import kafka
from classify_app.application import app


def bootstrap_servers() -> str:
    """The Kafka bootstrap servers of `CLASSIFY_BROKER`, as aiokafka takes them."""
    return kafka.bootstrap_servers(app.settings)


def fail(command: AppCommand, message: str) -> NoReturn:
    """End a command with `message` on standard error and exit status 1 (no traceback)."""
    command.say(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
