"""``her2low model schema|list|add|compare``, ``her2low train`` and ``her2low predict``.

Plain functions returning an exit code (0 ok, 2 bad input, 1 model/registry problem) so the lead
can wire them into the ``her2low`` command with :func:`add_subcommands`; errors are one line on
stderr naming the feature or file, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.schema import FEATURE_NAMES, TARGET, FeatureValidationError, list_features

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_INPUT = 2


def _error(message: str) -> None:
    print(f"her2low: error: {message}", file=sys.stderr)


def cmd_schema(json: bool = False) -> int:
    """Print the feature schema (``--json``: the machine listing)."""
    import json as _json

    listing = list_features()
    if json:
        print(_json.dumps(listing, indent=2))
        return EXIT_OK
    for f in listing["features"]:
        if f["kind"] == "categorical":
            detail = " | ".join(f["values"])
        else:
            lo, hi = f["range"]
            detail = f"[{lo:g}, {hi:g}] {f['unit']}"
        where = "" if len(f["applies_to"]) == 2 else f"  (only {', '.join(f['applies_to'])})"
        print(f"{f['name']:28s} {f['kind']:11s} {detail}{where}")
    return EXIT_OK


def cmd_train(
    cohort: str | Path,
    out: str | Path,
    target: str = TARGET,
    features: Sequence[str] | None = None,
    *,
    select: bool = False,
    name: str = "her2low-local",
    version: str = "0.1.0",
    bootstrap: int = 2000,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> int:
    """Train on COHORT.csv and write DIR/model.onnx, card.json, card.md and plots."""
    from models.data import CohortError, read_cohort_csv
    from models.training import ModelInfo, TrainingConfig, train_and_save

    chosen = tuple(features) if features else FEATURE_NAMES
    unknown = [f for f in chosen if f not in FEATURE_NAMES]
    if unknown:
        _error(f"unknown feature(s): {', '.join(unknown)} (see `her2low model schema`)")
        return EXIT_INPUT
    try:
        data = read_cohort_csv(cohort, target=target)
    except (CohortError, FileNotFoundError, UnicodeDecodeError) as exc:
        _error(str(exc))
        return EXIT_INPUT
    config = TrainingConfig(
        features=chosen, select=select, C=C, cv_folds=folds, n_bootstrap=bootstrap, seed=seed
    )
    info = ModelInfo(
        name=name,
        version=version,
        training_data=f"Locally labelled lesions from {Path(cohort).name}.",
        provenance={"command": "her2low train"},
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            card = train_and_save(data, Path(out), config, info)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_INPUT
    overall = next(
        m
        for m in card["performance"]["metrics"]
        if (m["task"], m["subset"]) == ("low_vs_rest", "all")
    )
    print(
        f"wrote {Path(out) / 'model.onnx'} ({card['variant']}, inputs: "
        f"{', '.join(card['onnx']['inputs'])}); out-of-fold AUC HER2-low vs rest "
        f"{overall['auc']:.3f} (95% CI {overall['ci_low']:.3f}-{overall['ci_high']:.3f}); "
        f"threshold {card['threshold']['value']:.3f}"
    )
    return EXIT_OK


def _read_inputs(inputs_json: str) -> Any:
    if inputs_json == "-":
        return json.load(sys.stdin)
    path = Path(inputs_json)
    if not inputs_json.lstrip().startswith(("{", "[")) and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return json.loads(inputs_json)


def cmd_predict(model_dir: str | Path | None, inputs_json: str, variant: str | None = None) -> int:
    """Predict from a JSON object (one lesion) or array (many): a file, ``-`` or literal JSON."""
    from models.registry import ModelIntegrityError, RegistryError
    from models.runtime import ModelLoadError, ModelRuntime

    try:
        payload = _read_inputs(inputs_json)
    except (json.JSONDecodeError, OSError) as exc:
        _error(f"inputs: not valid JSON ({exc})")
        return EXIT_INPUT
    try:
        runtime = ModelRuntime.load(Path(model_dir) if model_dir else None)
    except (ModelIntegrityError, ModelLoadError, RegistryError, OSError) as exc:
        _error(str(exc))
        return EXIT_MODEL
    try:
        if isinstance(payload, dict):
            result: Any = runtime.predict(payload, variant=variant).to_dict()
        elif isinstance(payload, list) and all(isinstance(r, dict) for r in payload):
            result = [p.to_dict() for p in runtime.predict_batch(payload, variant=variant)]
        else:
            _error("inputs: expected a JSON object or an array of objects")
            return EXIT_INPUT
    except FeatureValidationError as exc:
        _error(str(exc))
        return EXIT_INPUT
    except RegistryError as exc:
        _error(str(exc))
        return EXIT_MODEL
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_list(registry: str | Path | None = None) -> int:
    """List models, versions and variants in a registry (default: the shipped reference)."""
    from models.registry import Registry, reference_root

    reg = Registry(Path(registry) if registry else reference_root())
    for name in reg.names():
        for version in reg.versions(name):
            for entry in reg.entries(name, version):
                ref = " reference" if entry.card.get("reference") else ""
                print(f"{name} {version} {entry.variant.value}{ref} sha256={entry.sha256[:16]}…")
    return EXIT_OK


def cmd_add(model_dir: str | Path, registry: str | Path) -> int:
    """Add a trained model folder to a registry (hash checked first; versions immutable)."""
    from models.registry import ModelIntegrityError, Registry, RegistryError

    try:
        entry = Registry(Path(registry)).add(Path(model_dir))
    except (ModelIntegrityError, RegistryError, OSError) as exc:
        _error(str(exc))
        return EXIT_MODEL
    print(f"added {entry.name} {entry.version} {entry.variant.value} at {entry.path}")
    return EXIT_OK


def cmd_compare(model_dirs: Sequence[str | Path]) -> int:
    """Print AUC (95% CI) overall/mass/NME, Brier and threshold of several models side by side."""
    from models.registry import RegistryError, compare, resolve_entries

    try:
        entries = [e for d in model_dirs for e in resolve_entries(Path(d))]
    except (RegistryError, OSError) as exc:
        _error(str(exc))
        return EXIT_MODEL
    print(f"{'model':34s} {'subset':6s} {'n':>4s} {'AUC':>6s} {'95% CI':>13s} {'Brier':>6s} thr")
    for r in compare(entries):
        label = f"{r['name']} {r['version']} {r['variant']}"
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}"
        ci = "" if r["ci_low"] is None else f"{r['ci_low']:.3f}-{r['ci_high']:.3f}"
        print(
            f"{label:34s} {r['subset']:6s} {r['n']:4d} {auc:>6s} {ci:>13s} "
            f"{r['brier']:6.3f} {r['threshold']:.3f}"
        )
    return EXIT_OK


def add_subcommands(subparsers: Any) -> None:
    """Register ``model {schema,list,add,compare}``, ``train`` and ``predict``.

    Each parser sets ``func(args) -> int``; the caller runs ``sys.exit(args.func(args))``.
    """
    model = subparsers.add_parser("model", help="feature schema and model registry")
    model_sub = model.add_subparsers(dest="model_command", required=True)

    schema = model_sub.add_parser("schema", help="print the feature schema")
    schema.add_argument("--json", action="store_true", help="machine-readable listing")
    schema.set_defaults(func=lambda a: cmd_schema(json=a.json))

    lst = model_sub.add_parser("list", help="list models in a registry")
    lst.add_argument("registry", nargs="?", default=None)
    lst.set_defaults(func=lambda a: cmd_list(a.registry))

    add = model_sub.add_parser("add", help="add a trained model folder to a registry")
    add.add_argument("model_dir")
    add.add_argument("--registry", required=True)
    add.set_defaults(func=lambda a: cmd_add(a.model_dir, a.registry))

    cmp_ = model_sub.add_parser("compare", help="compare model cards side by side")
    cmp_.add_argument("model_dirs", nargs="+")
    cmp_.set_defaults(func=lambda a: cmd_compare(a.model_dirs))

    train = subparsers.add_parser("train", help="train a model on a labelled cohort CSV")
    train.add_argument("cohort", help="CSV, one row per lesion, columns named after features")
    train.add_argument("--out", required=True, help="output folder for model.onnx and the card")
    train.add_argument("--target", default=TARGET)
    train.add_argument("--features", nargs="+", default=None, help="default: all features")
    train.add_argument("--select", action="store_true", help="univariable then multivariable")
    train.add_argument("--name", default="her2low-local")
    train.add_argument("--version", default="0.1.0")
    train.add_argument("--bootstrap", type=int, default=2000)
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")
    train.set_defaults(
        func=lambda a: cmd_train(
            a.cohort,
            a.out,
            a.target,
            a.features,
            select=a.select,
            name=a.name,
            version=a.version,
            bootstrap=a.bootstrap,
            folds=a.folds,
            seed=a.seed,
            C=a.C,
        )
    )

    predict = subparsers.add_parser("predict", help="predict from JSON inputs")
    predict.add_argument("inputs_json", help="JSON file, '-' for stdin, or a JSON literal")
    predict.add_argument("--model", default=None, help="model/registry folder (default: reference)")
    predict.add_argument(
        "--variant", default=None, choices=["combined", "descriptors", "quantitative"]
    )
    predict.set_defaults(func=lambda a: cmd_predict(a.model, a.inputs_json, a.variant))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m models.cli``) until the lead wires ``her2low``."""
    parser = argparse.ArgumentParser(prog="her2low")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
