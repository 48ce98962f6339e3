"""``python -m cds_service``: the CDS service under gunicorn, the same as ``her2low service``.

The arguments are defined here once (:func:`add_arguments`, :func:`run`) and reused by the
``her2low`` command. This module imports nothing of the DICOM node.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "run the CDS service (CDS Hooks, results API, review app) under gunicorn"
DESCRIPTION = (
    "Serve CDS Hooks discovery and patient-view, the results API the node publishes to and the "
    "tumour-board review app on HER2LOW_CDS_HOST:HER2LOW_CDS_PORT (`her2low config --show`, "
    "section [service]). The database must be migrated first (`her2low db upgrade`)."
)


def _workers(text: str) -> int:
    from her2low.core.commands import positive_int

    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``her2low service`` / ``python -m cds_service``."""
    parser.add_argument(
        "--workers", type=_workers, default=2, help="gunicorn worker processes (4 threads each)"
    )


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM or Ctrl-C; a database that is not migrated is one line, exit 3."""
    from cds_service.wsgi import serve
    from her2low.core.commands import configured_settings

    serve(configured_settings(), workers=args.workers)
    return 0


COMMANDS = {"service": (HELP, DESCRIPTION, add_arguments, run)}


def main(argv: Sequence[str] | None = None) -> int:
    from her2low.core.commands import Parser, run_guarded

    parser = Parser(prog="python -m cds_service", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(parser.prog, run, args)


if __name__ == "__main__":
    raise SystemExit(main())
