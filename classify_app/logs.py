"""JSON logs (`CLASSIFY_LOG_FORMAT=json`): one object per line, for a log pipeline to index.

A record's `extra` fields that the stages set (`ad_id`, `stage`, `reason`) become keys of the
object, so an operator can follow one ad across the stages. Stages log at INFO only what is
rare (start-up, migrations, MongoDB coming back); per-image events are metrics, not log lines.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

CONTEXT_FIELDS = ("ad_id", "stage", "reason")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, context, error."""

    def format(self, record: logging.LogRecord) -> str:
        """Called by the logging handler for every record."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs() -> None:
    """Give every handler of the root logger the JSON format (after Faust set them up)."""
    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
