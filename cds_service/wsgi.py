"""Production entry points: gunicorn run from code (``her2low service``) or from its own CLI.

``gunicorn 'cds_service.wsgi:app()'`` calls the factory (settings from ``HER2LOW_*``) once per
worker and fails fast on an un-migrated database. ``cds_service.wsgi:app`` without parentheses
also works: called as a WSGI app it builds the real app on first request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from cds_service.app import AppPart, create_app
from cds_service.db import MIGRATIONS
from cds_service.metrics import enable_multiprocess
from her2low.core.logs import configure
from her2low.core.settings import Settings, load_settings

log = logging.getLogger(__name__)

_app: Flask | None = None
_lock = threading.Lock()


def production_app(settings: Settings, *, part: AppPart = AppPart.ALL) -> Flask:
    """The app with its model loaded and hash-checked now, not on the first hook call."""
    from cds_service.state import state

    flask_app = create_app(settings, part=part)
    with flask_app.app_context():
        try:
            state().runtime.get()
        except Exception:
            log.exception("model not loaded at start-up")
    return flask_app


def review_split(settings: Settings) -> bool:
    """True when the review app has its own address (``review_port``), apart from CDS Hooks."""
    review = (settings.review_host or settings.cds_host, settings.review_port)
    return settings.review_port != 0 and review != (settings.cds_host, settings.cds_port)


class PortDispatcher:
    """One app per listening port: gunicorn binds both ports, and a request is answered by the
    app of the port it arrived on (the local socket, not the client-chosen ``Host`` header)."""

    def __init__(self, by_port: dict[int, Flask]) -> None:
        self.by_port = by_port

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = environ.get("gunicorn.socket")
        try:
            port = int(sock.getsockname()[1]) if sock is not None else None
        except (OSError, IndexError, TypeError):
            port = None
        target = self.by_port.get(port) if port is not None else None
        if target is None:
            start_response("421 Misdirected Request", [("Content-Type", "text/plain")])
            return [b"no application on this port\n"]
        return target(environ, start_response)


def production_wsgi(settings: Settings) -> Flask | PortDispatcher:
    """The one app, or with ``review_port`` a hooks-only and a review-only app by port."""
    if not review_split(settings):
        return production_app(settings)
    return PortDispatcher(
        {
            settings.cds_port: production_app(settings, part=AppPart.HOOKS),
            settings.review_port: production_app(settings, part=AppPart.REVIEW),
        }
    )


def _get() -> Flask:
    global _app
    with _lock:
        if _app is None:
            settings = load_settings()
            configure(settings.log_level, settings.log_format)
            _app = production_app(settings)
        return _app


def app(*args: Any) -> Any:
    """The app factory (no arguments) or the WSGI app (environ, start_response)."""
    if not args:
        return _get()
    environ: dict[str, Any] = args[0]
    start_response: Callable[..., Any] = args[1]
    result: Iterable[bytes] = _get()(environ, start_response)
    return result


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any], settings: Settings) -> None:
        self.options = options
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return production_wsgi(self.settings)


def serve(settings: Settings, *, workers: int = 2) -> None:
    """Run the service under gunicorn on the configured address until stopped."""
    from her2low.core.private_files import check_private, private_umask

    private_umask()  # cds.db holds MRNs: nothing the service writes is readable by others
    check_private(settings.home)
    # Fail fast in the parent on an un-migrated database rather than in every worker.
    MIGRATIONS.check_current(settings.cds_database_url)
    enable_multiprocess(settings.home / "run" / f"metrics-{settings.cds_port}")  # see metrics.py
    options = {
        "bind": [f"{settings.cds_host}:{settings.cds_port}"]
        + (
            [f"{settings.review_host or settings.cds_host}:{settings.review_port}"]
            if review_split(settings)
            else []
        ),
        "workers": workers,
        # gthread: idle keep-alive connections wait in the worker's poller, not in a thread, so
        # an EHR that reuses connections skips the TCP handshake per hook call (a sync worker
        # closes every connection). Measured in docs/benchmarks.md (CDS Hooks section).
        "worker_class": "gthread",
        "threads": 4,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "timeout": 60,
    }
    _Gunicorn(options, settings).run()
