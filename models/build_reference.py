"""Rebuild the shipped reference models: ``python -m models.build_reference``.

Simulates the cohort (seeded), trains the combined, descriptors-only and quantitative-only
models with paper-style selection, and writes them to
``models/reference/her2low-reference/<version>/<variant>/`` with their cards. The same command
gives the same ONNX bytes and card numbers (up to library versions, recorded in the card).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

from models.contract import DEFAULT_CONVENTIONS, TrainingSettings
from models.data import Cohort, read_cohort_csv, write_cohort_csv
from models.prediction import ModelVariant
from models.registry import REFERENCE_NAME, reference_root
from models.simulate import PAPER_GROUP_SIZES, simulate_cohort
from models.training import VARIANT_FEATURES, ModelInfo, TrainingConfig, train_and_save

REFERENCE_VERSION = "0.1.0"
REFERENCE_SEED = 20250311
REFERENCE_CREATED = "2026-11-25"
#: The conventions the simulated features stand for: the node's default analysis (pipeline dki-2,
#: MP-PCA then nls_rician). The simulator draws feature values; no DKI fit computed them.
REFERENCE_FIT_SETTINGS = TrainingSettings(conventions=DEFAULT_CONVENTIONS)
REFERENCE_FEATURES_NOTE = (
    "The quantitative features are drawn by the simulator, not computed by a DKI fit of images: "
    "they stand for features computed under the conventions in fit_settings (the node's default "
    "analysis since pipeline dki-2: MP-PCA denoising, then the Rician-aware nls_rician fit), and "
    "results computed otherwise (e.g. nls without denoising, the dki-1 default) are stored but not "
    "scored."
)
REFERENCE_LIMITATION = (
    "REFERENCE MODEL TRAINED ON SIMULATED DATA. Not clinically validated; its performance "
    "figures describe the simulator, not patients. A site must train and validate a model on its "
    "own labelled cases (her2low train) before any clinical use."
)


def build(out_root: Path, *, version: str = REFERENCE_VERSION, n_bootstrap: int = 2000) -> Path:
    """Write the three reference variants under ``out_root``; return the version folder."""
    target = out_root / REFERENCE_NAME / version
    with tempfile.TemporaryDirectory() as tmp:
        cohort_path = Path(tmp) / "simulated_cohort.csv"
        write_cohort_csv(cohort_path, simulate_cohort(REFERENCE_SEED))
        cohort: Cohort = read_cohort_csv(cohort_path)
    info = ModelInfo(
        name=REFERENCE_NAME,
        version=version,
        reference=True,
        created=REFERENCE_CREATED,
        training_data=(
            "Simulated cohort from models.simulate (no patient data): group sizes of Shen et al., "
            "Tomography 2025;11(3):31 (HER2-zero 60 / low 91 / over 81), its directions of "
            "effect, assumed magnitudes, typical breast DKI values. " + REFERENCE_FEATURES_NOTE
        ),
        provenance={
            "generator": "models.simulate.simulate_cohort",
            "seed": REFERENCE_SEED,
            "group_sizes": PAPER_GROUP_SIZES,
            "command": "python -m models.build_reference",
            "feature_conventions": "simulated under fit_settings (not fitted from images)",
        },
        extra_limitations=(REFERENCE_LIMITATION, REFERENCE_FEATURES_NOTE),
        fit_settings=REFERENCE_FIT_SETTINGS,
        domain_note=(
            "Simulated cohort: no scanner, so field strength and vendor are not recorded and not "
            "checked; the b-values are the protocol the simulator assumes, the feature ranges "
            "those of the simulated lesions."
        ),
    )
    if target.exists():
        shutil.rmtree(target)
    for variant in ModelVariant:
        config = TrainingConfig(
            features=VARIANT_FEATURES[variant],
            select=True,
            n_bootstrap=n_bootstrap,
            seed=REFERENCE_SEED,
        )
        train_and_save(cohort, target / variant.value, config, info)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=reference_root())
    parser.add_argument("--version", default=REFERENCE_VERSION)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        path = build(args.out, version=args.version, n_bootstrap=args.bootstrap)
    print(f"reference models written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
