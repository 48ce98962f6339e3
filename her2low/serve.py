"""Serve the CDS service with gunicorn (production server) from code, on the configured port."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from her2low.settings import Settings


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any], settings: Settings) -> None:
        self.options = options
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from cds_service.app import create_app
        from cds_service.state import state

        app = create_app(self.settings)
        with app.app_context():
            try:  # load and hash-check the model now, not on the first result or hook call
                state().runtime.get()
            except Exception:
                logging.getLogger(__name__).exception("model not loaded at start-up")
        return app


def serve(settings: Settings, *, workers: int = 2) -> None:
    # Fail fast in the parent on an un-migrated database rather than in every worker.
    from cds_service.db import check_current

    check_current(settings.cds_database_url)
    options = {
        "bind": f"{settings.cds_host}:{settings.cds_port}",
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
