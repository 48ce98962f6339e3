"""``her2low``: one command for operators, integrators and site data scientists.

Every command's arguments are defined once, by the module that runs it: each exposes
``COMMANDS = {name: (help, description, add_arguments, run)}`` (the help line for its own entry
point, ``python -m dicom_node`` for example). This module composes them and imports a command's
component only when that command is named, so ``her2low node`` never loads the service's code
(nor the reverse) and ``her2low --help`` imports no component: its one-line summaries are the
table below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from her2low import __version__
from her2low.core.commands import Parser, configured_settings, run_guarded

Spec = tuple[
    str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]

# command -> (module whose COMMANDS[command] defines it, summary in `her2low --help`), in order.
MODULES: dict[str, tuple[str, str]] = {
    "up": ("her2low.up", "start node, worker and service on embedded defaults (+ the demo study)"),
    "node": ("dicom_node.processes", "run the DICOM node (C-STORE SCP + series stability timers)"),
    "worker": ("dicom_node.processes", "run analysis workers (DKI fit, ROI, features, publishing)"),
    "service": ("cds_service.__main__", "run the CDS service (CDS Hooks, results API, review app)"),
    "demo": ("her2low.demo", "send the synthetic study to a running system, show the card; token"),
    "synth": ("dicom_node.synth.study", "write a synthetic breast DKI study (DWI, T2, SEG, truth)"),
    "inspect": ("dicom_node.series.inspection", "describe the DICOM series in files or folders"),
    "fit": ("dicom_node.analysis.cohort", "offline DKI analysis of studies or a research cohort"),
    "export": ("dicom_node.jobs.export", "list result exports to DICOM destinations, or retry"),
    "model": ("models.cli", "the model's input schema and the model registry"),
    "train": ("models.cli", "train and export a model from a labelled cohort CSV"),
    "predict": ("models.cli", "predict one case (or many) from JSON inputs"),
    "user": ("cds_service.accounts_cli", "review-app accounts: add, list, disable, enable, reset"),
    "db": ("her2low.cli", "database migrations (db upgrade)"),
    "config": ("her2low.cli", "show every setting with its value and meaning"),
}


# --- the commands defined here: db, config --------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from her2low.up import upgrade_databases

    upgrade_databases(configured_settings())
    print("node and service databases are at the latest revision")
    return 0


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser(
        "upgrade",
        help="apply migrations to both databases",
        description="Create or upgrade the node and the service databases to their latest "
        "revision (idempotent). `her2low up` does this itself; separate deployments run it "
        "before starting `node`, `worker` or `service`.",
        formatter_class=parser.formatter_class,
    ).set_defaults(func=cmd_db_upgrade)


def _nested(args: argparse.Namespace) -> int:
    """Run the sub-command's handler (the sub-parser set ``func``)."""
    code: int = args.func(args)
    return code


def cmd_config(args: argparse.Namespace) -> int:
    from her2low.core.settings import SECTIONS, describe, load_settings

    rows = describe(load_settings())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    order = {name: i for i, name in enumerate(SECTIONS)}
    rows.sort(key=lambda r: order.get(r["section"], len(order)))  # stable: field order kept
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            print(f"{'' if section == rows[0]['section'] else chr(10)}[{section}]")
        print(f"{row['variable']} = {json.dumps(row['value'])}\n    {row['description']}")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", action="store_true", help="print the settings (the default)")
    parser.add_argument("--json", action="store_true", help="one JSON list, a row per setting")


COMMANDS: dict[str, Spec] = {
    "db": (
        "database migrations",
        "Database migrations of the node and the service (Alembic; SQLite by default, "
        "PostgreSQL when scaled).",
        add_db_arguments,
        _nested,
    ),
    "config": (
        "show every setting with its value and meaning",
        "Print every HER2LOW_* setting, grouped by component (floor, node, worker, service, "
        "model), with its current value (secrets masked) and what it means. Values come from "
        "the environment, then the TOML file named by HER2LOW_CONFIG "
        "(default $HER2LOW_HOME/her2low.toml).",
        add_config_arguments,
        cmd_config,
    ),
}


# --- composition -----------------------------------------------------------------------------


def _spec(name: str) -> Spec:
    spec: Spec = importlib.import_module(MODULES[name][0]).COMMANDS[name]
    return spec


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``, or None when the whole listing is needed (``--help``)."""
    for token in argv:
        if token in ("-h", "--help"):
            return None
        if not token.startswith("-"):
            return token
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``her2low`` parser; only ``command``'s component is imported (None: the listing)."""
    parser = Parser(
        prog="her2low",
        description="HER2-low likelihood from breast MRI: a DICOM node, a CDS Hooks service and "
        "the model's tools (reference model, NOT clinically validated). Settings are HER2LOW_* "
        "variables (`her2low config --show`); `her2low COMMAND --help` tells more.",
    )
    parser.add_argument("--version", action="version", version=f"her2low-cds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, summary) in MODULES.items():
        if name != command:
            sub.add_parser(name, help=summary)  # listed; its component is not imported
            continue
        _help, description, add_arguments, run = _spec(name)
        p = sub.add_parser(name, help=summary, description=description)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(arguments))
    args: Any = parser.parse_args(arguments)
    from her2low.core.logs import configure_cli

    configure_cli()  # warnings (pydicom's) as one clean line each, never raw
    return run_guarded(f"her2low {args.command}", args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
