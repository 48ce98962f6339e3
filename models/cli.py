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
from collections.abc import Callable, Sequence
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
    from models.contract import DEFAULT_CONVENTIONS, TrainingSettings
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
        # the cohort's own fit (her2low fit's method/denoise columns), so the card scores
        # exactly the results computed the same way
        fit_settings=TrainingSettings(
            conventions=DEFAULT_CONVENTIONS.model_copy(update={"fit": data.fit})
        ),
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
    """``-`` (stdin), ``@file.json``, a file name, or the JSON itself."""
    if inputs_json == "-":
        return json.load(sys.stdin)
    if inputs_json.startswith("@"):
        return json.loads(Path(inputs_json[1:]).read_text(encoding="utf-8"))
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
    except json.JSONDecodeError as exc:
        _error(f"inputs: not valid JSON ({exc})")
        return EXIT_INPUT
    except (OSError, UnicodeDecodeError) as exc:
        _error(f"inputs: cannot read {inputs_json.removeprefix('@')} ({exc})")
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

    root = Path(registry) if registry else reference_root()
    if not root.is_dir():
        _error(f"registry {root}: no such folder")
        return EXIT_MODEL
    reg = Registry(root)
    names = reg.names()
    if not names:
        _error(f"registry {root}: no models (add one with `her2low model add DIR --registry`)")
        return EXIT_MODEL
    for name in names:
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


MODEL_HELP = "the model's input schema and the model registry (list, add, compare, recalibrate)"
MODEL_DESCRIPTION = (
    "Inspect the feature schema the models take, and manage a registry of trained models: "
    "list what it holds, add a trained model folder (its hashes checked first; versions are "
    "immutable), compare model cards side by side, or recalibrate a model on a site's "
    "labelled cases without retraining."
)
TRAIN_HELP = "train and export a model from a labelled cohort CSV"
TRAIN_DESCRIPTION = (
    "Fit the logistic model on COHORT.csv (one row per lesion, columns named after the features "
    "of `her2low model schema`, plus the target), validate it out-of-fold with bootstrap 95% "
    "confidence intervals, and write OUT/model.onnx with its model card (card.json, card.md) and "
    "plots. See docs/models.md."
)
PREDICT_HELP = "predict one case (or many) from JSON inputs"
PREDICT_DESCRIPTION = (
    "Score feature values with a model (default: the shipped reference model). INPUTS is a JSON "
    "object (one lesion) or array (many), given literally, as @file.json, as a file name, or "
    "'-' for stdin. Prints the prediction(s) as JSON."
)
_VARIANTS = ["combined", "descriptors", "quantitative"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except the uninformative None and False of bare flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def cmd_recalibrate(model_dir: str | Path, cohort: str | Path, method: str, out: str | Path) -> int:
    """Recalibrate a model folder on a site's labelled cases; write the copy to ``out``."""
    from models.data import CohortError
    from models.recalibration import recalibrate, summary
    from models.registry import RegistryError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            card = recalibrate(Path(model_dir), Path(cohort), method, Path(out))
    except (CohortError, FeatureValidationError, ValueError) as exc:
        _error(str(exc))
        return EXIT_INPUT
    except (RegistryError, OSError) as exc:
        _error(str(exc))
        return EXIT_MODEL
    print(summary(card))
    return EXIT_OK


def _sub(parent: Any, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    """A sub-parser that shows defaults like the ``her2low`` command does."""
    parser: argparse.ArgumentParser = parent.add_parser(
        name, help=help_, description=description, formatter_class=_Formatter
    )
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``model {schema,list,add,compare,recalibrate}``."""
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    fmt = parser.formatter_class

    def child(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name, help=help_, description=description, formatter_class=fmt
        )
        return made

    q = child(
        "schema",
        "list the model's input features",
        "Print every input feature with "
        "its kind, unit, range or values, and the lesion types it applies to.",
    )
    q.add_argument("--json", action="store_true", help="machine-readable listing")
    q.set_defaults(func=lambda a: cmd_schema(json=a.json))

    q = child(
        "list",
        "models, versions and variants in a registry",
        "List the models of a "
        "registry folder (default: the shipped reference model). Exit 1 when the folder "
        "does not exist or holds no model.",
    )
    q.add_argument(
        "registry_dir",
        nargs="?",
        type=Path,
        default=None,
        metavar="REGISTRY",
        help="registry folder (default: the shipped reference)",
    )
    q.add_argument("--registry", type=Path, default=None, help="the same, as an option")
    q.set_defaults(func=_run_list)

    q = child(
        "add",
        "add a trained model folder to a registry (hash checked)",
        "Copy a "
        "model folder written by `her2low train` into a registry after checking its "
        "hashes; a version already there is never overwritten.",
    )
    q.add_argument("model_dir", type=Path, help="folder with model.onnx and card.json")
    q.add_argument("--registry", type=Path, required=True, help="registry folder")
    q.set_defaults(func=lambda a: cmd_add(a.model_dir, a.registry))

    q = child(
        "compare",
        "AUC (95%% CI) overall/mass/NME of models side by side",
        "Print the "
        "out-of-fold AUC with its 95% confidence interval per lesion subset, the Brier "
        "score and the threshold of each model (folders or registries).",
    )
    q.add_argument(
        "model_dirs", nargs="+", type=Path, metavar="MODEL", help="model folder or registry"
    )
    q.set_defaults(func=lambda a: cmd_compare(a.model_dirs))

    q = child(
        "recalibrate",
        "recalibrate a model on a site's labelled cases (Platt or isotonic)",
        "Fit a monotone map of P(HER2-low) on a labelled cohort CSV without retraining; write "
        "a copy of the model folder with the map, the mapped threshold and before/after "
        "calibration plots in its card.",
    )
    q.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="one model variant folder")
    q.add_argument("cohort", type=Path, metavar="COHORT", help="labelled cohort CSV")
    q.add_argument("--method", choices=("platt", "isotonic"), default="platt", help="map")
    q.add_argument("--out", type=Path, required=True, help="output model folder")
    q.set_defaults(func=lambda a: cmd_recalibrate(a.model_dir, a.cohort, a.method, a.out))


def _run_list(args: argparse.Namespace) -> int:
    if args.registry and args.registry_dir and args.registry != args.registry_dir:
        _error("give the registry once: as REGISTRY or as --registry")
        return EXIT_INPUT
    return cmd_list(args.registry or args.registry_dir)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``train COHORT --out DIR`` and every option of :func:`cmd_train`."""
    parser.add_argument("cohort", help="CSV, one row per lesion, columns named after features")
    parser.add_argument("--out", required=True, help="output folder for model.onnx and the card")
    parser.add_argument("--target", default=TARGET, help="label column")
    parser.add_argument(
        "--features",
        nargs="+",
        default=None,
        metavar="FEATURE",
        help="features to use (default: all of `her2low model schema`)",
    )
    parser.add_argument(
        "--select", action="store_true", help="univariable screening, then multivariable selection"
    )
    parser.add_argument("--name", default="her2low-local", help="model name on its card")
    parser.add_argument("--version", default="0.1.0", help="model version on its card")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples for the confidence intervals",
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="random seed (folds, bootstrap)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    return cmd_train(
        args.cohort,
        args.out,
        args.target,
        args.features,
        select=args.select,
        name=args.name,
        version=args.version,
        bootstrap=args.bootstrap,
        folds=args.folds,
        seed=args.seed,
        C=args.C,
    )


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """``predict INPUTS [--model DIR] [--variant V]``."""
    parser.add_argument(
        "inputs_json",
        metavar="INPUTS",
        help="JSON literal, @file.json, a file name, or '-' for stdin",
    )
    parser.add_argument(
        "--model",
        "--model-dir",
        dest="model",
        type=Path,
        default=None,
        help="model or registry folder (default: the shipped reference)",
    )
    parser.add_argument(
        "--variant",
        default=None,
        choices=_VARIANTS,
        help="which model variant (default: the best the inputs allow)",
    )
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    return cmd_predict(args.model, args.inputs_json, args.variant)


def _run_model(args: argparse.Namespace) -> int:
    code: int = args.func(args)
    return code


COMMANDS: dict[
    str,
    tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "model": (MODEL_HELP, MODEL_DESCRIPTION, add_model_arguments, _run_model),
    "train": (TRAIN_HELP, TRAIN_DESCRIPTION, add_train_arguments, run_train),
    "predict": (PREDICT_HELP, PREDICT_DESCRIPTION, add_predict_arguments, run_predict),
}


def add_subcommands(subparsers: Any) -> None:
    """Register ``model {schema,list,add,compare,recalibrate}``, ``train`` and ``predict``.

    Each parser sets ``func(args) -> int``; the caller runs ``sys.exit(args.func(args))``.
    """
    for name, (help_, description, add_arguments, _run) in COMMANDS.items():
        parser = _sub(subparsers, name, help_, description)
        add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """``python -m models.cli``: the same commands as ``her2low model|train|predict``."""
    parser = argparse.ArgumentParser(
        prog="python -m models.cli", description=__doc__, formatter_class=_Formatter
    )
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
