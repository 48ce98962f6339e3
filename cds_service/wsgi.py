"""Production entry point for gunicorn.

``gunicorn 'cds_service.wsgi:app()'`` calls the factory (settings from ``HER2LOW_*``) once per
worker and fails fast on an un-migrated database. ``cds_service.wsgi:app`` without parentheses
also works: called as a WSGI app it builds the real app on first request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from cds_service.app import create_app

_app: Flask | None = None
_lock = threading.Lock()


def _get() -> Flask:
    global _app
    with _lock:
        if _app is None:
            from her2low.logs import configure
            from her2low.settings import load_settings

            settings = load_settings()
            configure(settings.log_level, settings.log_format)
            _app = create_app(settings)
        return _app


def app(*args: Any) -> Any:
    """The app factory (no arguments) or the WSGI app (environ, start_response)."""
    if not args:
        return _get()
    environ: dict[str, Any] = args[0]
    start_response: Callable[..., Any] = args[1]
    result: Iterable[bytes] = _get()(environ, start_response)
    return result
