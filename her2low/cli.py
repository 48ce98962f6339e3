"""``her2low``: one command for operators, integrators and site data scientists.

Sub-commands import their component lazily, so ``her2low --help`` is instant and the node never
loads the service's code (or the reverse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from her2low import __version__
from her2low.core import logs
from her2low.core.database import NotMigratedError
from her2low.core.settings import ConfigurationError, Settings, describe, load_settings


def _settings() -> Settings:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    return settings


def cmd_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    rows = describe(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['variable']} = {json.dumps(row['value'])}\n    {row['description']}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from her2low.up import upgrade_databases

    upgrade_databases(_settings())
    print("node and service databases are at the latest revision")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from dicom_node.processes import run_node

    run_node(_settings())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.processes import run_worker

    run_worker(_settings())
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from cds_service.wsgi import serve

    serve(_settings(), workers=args.workers)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from her2low.up import up

    return up(_settings(), demo=not args.no_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from her2low.demo import demo

    return demo(_settings(), as_json=args.json, timeout=args.timeout, seed=args.seed)


def cmd_synth(args: argparse.Namespace) -> int:
    from dicom_node.synth import cmd_synth as run

    return run(args.out, args.seed, args.lesion, args.snr, args.vendor)


def cmd_inspect(args: argparse.Namespace) -> int:
    from dicom_node.series.inspection import cmd_inspect as run

    return run(args.paths, args.json)


def cmd_fit(args: argparse.Namespace) -> int:
    from dicom_node.analysis.cohort import cmd_fit as run

    return run(args)


def cmd_model_schema(args: argparse.Namespace) -> int:
    from models.cli import cmd_schema

    return cmd_schema(args.json)


def cmd_model_list(args: argparse.Namespace) -> int:
    from models.cli import cmd_list

    return cmd_list(args.registry)


def cmd_model_add(args: argparse.Namespace) -> int:
    from models.cli import cmd_add

    return cmd_add(args.model_dir, args.registry)


def cmd_model_compare(args: argparse.Namespace) -> int:
    from models.cli import cmd_compare

    return cmd_compare(args.model_dirs)


def cmd_train(args: argparse.Namespace) -> int:
    from models.cli import cmd_train as run

    return run(args.cohort, args.out, args.target, args.features)


def cmd_predict(args: argparse.Namespace) -> int:
    from models.cli import cmd_predict as run

    return run(args.model_dir, args.inputs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="her2low",
        description="HER2-low likelihood from breast MRI (reference model, not clinically validated).",
    )
    parser.add_argument("--version", action="version", version=f"her2low-cds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "up", help="start node, worker and service on embedded defaults (+ demo study)"
    )
    p.add_argument("--no-demo", action="store_true", help="do not load the synthetic demo study")
    p.set_defaults(func=cmd_up)

    sub.add_parser("node", help="run the DICOM node (SCP + stability timers)").set_defaults(
        func=cmd_node
    )
    sub.add_parser("worker", help="run analysis workers").set_defaults(func=cmd_worker)
    p = sub.add_parser("service", help="run the CDS service (gunicorn)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_service)

    p = sub.add_parser(
        "demo", help="send the synthetic study to a running system and show the card"
    )
    p.add_argument("--json", action="store_true", help="one JSON object for EHR integrators")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic breast DKI study (DICOM + truth)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lesion", choices=["mass", "nme"], default="mass")
    p.add_argument("--snr", type=float, default=30.0)
    p.add_argument("--vendor", choices=["siemens", "ge", "philips"], default="siemens")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="report series, roles and b-values of DICOM files")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fit", help="offline DKI analysis of studies or a cohort folder")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--roi", type=Path, default=None, help="DICOM SEG of the tumour")
    p.add_argument("--method", choices=["wls", "nls", "nls_rician"], default="nls")
    p.add_argument("--out", type=Path, default=Path("her2low-fit"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--jobs", type=int, default=1)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("model", help="model schema and registry")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    q = msub.add_parser("schema", help="list the model's input features")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_model_schema)
    q = msub.add_parser("list", help="models, versions and variants in a registry")
    q.add_argument("--registry", type=Path, default=None, help="default: the shipped reference")
    q.set_defaults(func=cmd_model_list)
    q = msub.add_parser("add", help="add a trained model folder to a registry (hash checked)")
    q.add_argument("model_dir", type=Path)
    q.add_argument("--registry", type=Path, required=True)
    q.set_defaults(func=cmd_model_add)
    q = msub.add_parser("compare", help="AUC (95% CI) overall/mass/NME of models side by side")
    q.add_argument("model_dirs", nargs="+", type=Path)
    q.set_defaults(func=cmd_model_compare)

    p = sub.add_parser("train", help="train and export a model from a labelled cohort CSV")
    p.add_argument("cohort", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", default="her2_group")
    p.add_argument("--features", nargs="*", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict one case from JSON inputs")
    p.add_argument("inputs", help="JSON object of feature values, or @file.json")
    p.add_argument("--model-dir", type=Path, default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("db", help="database migrations")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    dsub.add_parser("upgrade", help="apply migrations to both databases").set_defaults(
        func=cmd_db_upgrade
    )

    p = sub.add_parser("config", help="show every setting with its value and meaning")
    p.add_argument("--show", action="store_true", help="(default) print the settings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"her2low: configuration error: {exc}", file=sys.stderr)
        return 2
    except NotMigratedError as exc:
        print(f"her2low: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
