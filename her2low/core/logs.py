"""Structured logging: one JSON event per line, identifiers only, never patient data.

Call sites log with ``extra={...}`` fields (study/series UIDs, job ids). A filter drops any
field whose name suggests patient identity or credentials, so a careless call cannot leak them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FORBIDDEN = ("patient", "name", "birth", "mrn", "token", "authorization", "jwt", "password")
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object with its ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            if any(word in key.lower() for word in _FORBIDDEN):
                continue
            event[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            event["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(event, separators=(",", ":"))


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Install the handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_her2low", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._her2low = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom logs dataset contents at DEBUG; keep it at WARNING so no header reaches the log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("huey").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
