"""``python -m cds_service``: the development server.

Production: gunicorn ``'cds_service.wsgi:app()'``.
"""

from __future__ import annotations

import sys

from cds_service.app import create_app
from her2low.core.database import NotMigratedError
from her2low.core.logs import configure
from her2low.core.settings import ConfigurationError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"her2low service: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except (NotMigratedError, ValueError) as exc:
        print(f"her2low service: {exc}", file=sys.stderr)
        return 2
    app.run(host=settings.cds_host, port=settings.cds_port, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
