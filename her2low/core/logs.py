"""Structured logging: one JSON event per line, identifiers only, never patient data.

Call sites log with ``extra={...}`` fields (study/series UIDs, job ids). A filter drops any
field whose name suggests patient identity or credentials, so a careless call cannot leak them.
Python warnings (pydicom's ``UserWarning`` on odd files) go through the ``py.warnings`` logger as
one event each, with quoted values blanked: they may quote a header value such as a name.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

_FORBIDDEN = ("patient", "name", "birth", "mrn", "token", "authorization", "jwt", "password")
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: What the standard library's own capture logs: "file:line: Category: message\n  source".
_STDLIB_WARNING = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): (?P<text>.*)", re.S)
WARNINGS_LOGGER = "py.warnings"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: one log record, no source line, values blanked."""
    logging.getLogger(WARNINGS_LOGGER).warning(
        _clean(str(message)),
        extra={"category": category.__name__, "origin": _origin(filename, lineno)},
    )


def _clean(text: str) -> str:
    return _QUOTED.sub("'…'", text).replace("\n", " ").strip()


def _origin(filename: str, lineno: int | str) -> str:
    where = Path(filename)
    return f"{where.parent.name}/{where.name}:{lineno}"


def capture_warnings() -> None:
    """Route every Python warning to logging (idempotent)."""
    logging.captureWarnings(True)  # so that captureWarnings(False) restores the original
    warnings.showwarning = _show_warning


class CliWarningFormatter(logging.Formatter):
    """``her2low: warning: <message> (<origin>)``: one clean line on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        origin = getattr(record, "origin", "")
        return f"her2low: warning: {record.getMessage()}" + (f" ({origin})" if origin else "")


def configure_cli() -> None:
    """For commands that print to a terminal (``inspect``, ``fit``): warnings as one line each
    on stderr unless :func:`configure` installs the structured handler later."""
    capture_warnings()
    logger = logging.getLogger(WARNINGS_LOGGER)
    for old in [h for h in logger.handlers if getattr(h, "_her2low_cli", False)]:
        logger.removeHandler(old)  # bound to an earlier sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    handler._her2low_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(CliWarningFormatter())
    logger.addHandler(handler)
    logger.propagate = False


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
        if record.name == WARNINGS_LOGGER and "category" not in vars(record):
            # logged by logging.captureWarnings' own hook: split, drop the source line, blank
            match = _STDLIB_WARNING.match(event["event"])
            if match:
                event["event"] = _clean(match["text"].split("\n  ", 1)[0])
                event["category"] = match["category"]
                event["origin"] = _origin(match["file"], match["line"])
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
    """Install the handler on the root logger (idempotent); warnings become log events."""
    capture_warnings()
    captured = logging.getLogger(WARNINGS_LOGGER)
    for cli_handler in [h for h in captured.handlers if getattr(h, "_her2low_cli", False)]:
        captured.removeHandler(cli_handler)
    captured.propagate = True
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
    # pydicom both logs and warns each problem, the log line quoting values: keep the warning
    logging.getLogger("pydicom").setLevel(logging.ERROR)
