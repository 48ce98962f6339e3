"""Train, evaluate and write a model: DIR/model.onnx + DIR/card.json + DIR/card.md (+ plots).

One call, :func:`train_and_save`, is what ``her2low train`` and ``python -m models.build_reference``
run, so a site model and the reference model are built and documented the same way.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import skl2onnx
import sklearn

from models.card import SEED_PAPER
from models.contract import TrainingSettings
from models.data import Cohort
from models.domain import TrainingDomain
from models.estimator import Her2LowClassifier
from models.evaluation import (
    TASKS,
    TaskScores,
    calibration,
    decision_curve,
    oof_proba,
    performance_rows,
    youden_threshold,
)
from models.export import OUTPUT_LABEL, OUTPUT_PROBABILITIES, onnx_input_type, to_onnx
from models.prediction import ModelVariant
from models.schema import (
    DESCRIPTOR_NAMES,
    FEATURE_NAMES,
    FEATURES,
    FIT_SETTINGS,
    LESION_TYPE,
    QUANTITATIVE_NAMES,
    SCHEMA_VERSION,
    FeatureKind,
)

CARD_VERSION = 1
POSITIVE = "low"
CONTRIBUTION_METHOD = {
    "model": "multinomial",
    "contrast": "low_vs_zero",
    "definition": (
        "log(P(low)/P(zero)) of the multinomial model split into one term per input: "
        "(coef_low - coef_zero) x standardised value for numbers (missing = training median), "
        "(coef_low - coef_zero) of the active one-hot level for descriptors ('' = not entered). "
        "The terms plus the intercept difference add up to the log-odds exactly."
    ),
}


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a model besides the cohort (recorded in the card)."""

    features: tuple[str, ...] = FEATURE_NAMES
    select: bool = False
    alpha_univariable: float = 0.05
    alpha_multivariable: float = 0.05
    C: float = 1.0
    class_weight: str | None = None
    cv_folds: int = 5
    n_bootstrap: int = 2000
    seed: int = 0

    def estimator(self, features: Sequence[str] | None = None) -> Her2LowClassifier:
        return Her2LowClassifier(
            tuple(features if features is not None else self.features),
            select=self.select,
            alpha_univariable=self.alpha_univariable,
            alpha_multivariable=self.alpha_multivariable,
            C=self.C,
            class_weight=self.class_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "select": self.select,
            "alpha_univariable": self.alpha_univariable,
            "alpha_multivariable": self.alpha_multivariable,
            "C": self.C,
            "penalty": "l2",
            "solver": "lbfgs",
            "class_weight": self.class_weight,
            "cv_folds": self.cv_folds,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ModelInfo:
    """Identity and documentation of a model (what the card says about it besides numbers)."""

    name: str = "her2low-local"
    version: str = "0.1.0"
    reference: bool = False
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d"))
    training_data: str = "Locally labelled lesions (site cohort)."
    provenance: dict[str, Any] = field(default_factory=dict)
    extra_limitations: tuple[str, ...] = ()
    #: The fit and discretisation settings the cohort's quantitative features were computed
    #: with; the runtime refuses results computed otherwise (``models.contract``).
    fit_settings: TrainingSettings = FIT_SETTINGS
    #: Acquisition the training cases came from (empty = not recorded, not checked) and a note
    #: on the domain (``models.domain``; a case outside it is scored with a warning).
    field_strengths_t: tuple[float, ...] = ()
    vendors: tuple[str, ...] = ()
    domain_note: str = ""


@dataclass
class TrainedModel:
    """The fitted models and their out-of-fold evaluation."""

    config: TrainingConfig
    multinomial: Her2LowClassifier
    binary: dict[str, Her2LowClassifier]
    performance: list[dict[str, Any]]
    calibration: dict[str, Any]
    decision_curve: dict[str, Any]
    threshold: dict[str, Any]

    @property
    def variant(self) -> ModelVariant:
        return variant_of(self.multinomial.selected_features_)


def variant_of(features: Sequence[str]) -> ModelVariant:
    """Which inputs a feature set uses: descriptors, quantitative or both."""
    has_desc = any(FEATURES[f].kind is FeatureKind.CATEGORICAL for f in features)
    has_quant = any(FEATURES[f].kind is FeatureKind.NUMERIC for f in features)
    if has_desc and has_quant:
        return ModelVariant.COMBINED
    return ModelVariant.DESCRIPTORS if has_desc else ModelVariant.QUANTITATIVE


VARIANT_FEATURES: dict[ModelVariant, tuple[str, ...]] = {
    ModelVariant.COMBINED: FEATURE_NAMES,
    ModelVariant.DESCRIPTORS: DESCRIPTOR_NAMES,
    ModelVariant.QUANTITATIVE: QUANTITATIVE_NAMES,
}


def train(cohort: Cohort, config: TrainingConfig) -> TrainedModel:
    """Fit the multinomial and binary models and evaluate them out of fold."""
    unknown = [f for f in config.features if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown features: {', '.join(unknown)}")
    X = cohort.matrix(config.features)
    y = cohort.y
    if POSITIVE not in set(y):
        raise ValueError("the cohort has no HER2-low cases")
    lesion_types = cohort.lesion_types
    multinomial = config.estimator().fit(X, y)
    proba = oof_proba(config.estimator(), X, y, n_splits=config.cv_folds, seed=config.seed)
    low_col = list(multinomial.classes_).index(POSITIVE)
    p_low = proba[:, low_col]
    is_low = y == POSITIVE
    scores = [TaskScores(TASKS[0], np.arange(len(y)), is_low, p_low)]
    binary: dict[str, Her2LowClassifier] = {}
    for task in TASKS[1:]:
        idx = np.flatnonzero(np.isin(y, (POSITIVE, *task.negatives)))
        if len(set(y[idx])) < 2:
            continue
        binary[task.name] = config.estimator().fit(X[idx], y[idx])
        bp = oof_proba(
            config.estimator(), X[idx], y[idx], n_splits=config.cv_folds, seed=config.seed
        )
        pos_col = list(binary[task.name].classes_).index(POSITIVE)
        scores.append(TaskScores(task, idx, y[idx] == POSITIVE, bp[:, pos_col]))
    return TrainedModel(
        config=config,
        multinomial=multinomial,
        binary=binary,
        performance=performance_rows(
            scores, lesion_types, n_boot=config.n_bootstrap, seed=config.seed
        ),
        calibration=calibration(is_low, p_low),
        decision_curve=decision_curve(is_low, p_low),
        threshold=youden_threshold(is_low, p_low),
    )


def coefficients(model: Her2LowClassifier) -> dict[str, Any]:
    """The fitted terms (preprocessing constants + coefficients per class) for card and runtime."""
    coef = model.coef_
    intercept = model.intercept_
    classes = [str(c) for c in model.classes_]
    if coef.shape[0] == 1:  # binary: sklearn stores the positive (second) class only
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    terms = []
    for k, term in enumerate(model.terms()):
        entry: dict[str, Any] = {"feature": term.feature, "level": term.level}
        if term.level is None:
            entry.update(mean=term.mean, scale=term.scale, impute=term.impute)
        entry["coef"] = {c: float(coef[i, k]) for i, c in enumerate(classes)}
        terms.append(entry)
    return {
        "classes": classes,
        "intercept": {c: float(intercept[i]) for i, c in enumerate(classes)},
        "terms": terms,
    }


def _check_cases(model: Her2LowClassifier) -> list[dict[str, Any]]:
    """Synthetic cases (not patients) whose probabilities the runtime re-checks at load.

    One "typical" mass (first controlled value of each mass descriptor, training medians for the
    numbers) and one with every input missing.
    """
    typical: dict[str, Any] = {}
    blank: dict[str, Any] = {}
    for term in model.terms():
        spec = FEATURES[term.feature]
        if term.level is None:
            typical[term.feature] = term.impute
            blank[term.feature] = None
        else:
            applies = "mass" in {t.value for t in spec.applies_to}
            level = "mass" if term.feature == LESION_TYPE else spec.values[0]
            typical[term.feature] = level if applies else ""
            blank[term.feature] = ""
    cases = []
    for inputs in (typical, blank):
        X = np.empty((1, len(model.input_features_)), dtype=object)
        for j, name in enumerate(model.input_features_):
            categorical = FEATURES[name].kind is FeatureKind.CATEGORICAL
            value = inputs.get(name)
            if value is None:
                X[0, j] = "" if categorical else float("nan")
            else:
                X[0, j] = value if categorical else float(value)
        proba = model.predict_proba(X)[0]
        cases.append({"inputs": inputs, "probabilities": [float(p) for p in proba]})
    return cases


def training_domain(model: Her2LowClassifier, cohort: Cohort, info: ModelInfo) -> TrainingDomain:
    """The protocol, scanners and numeric input ranges of the cases the model was trained on."""
    numeric = [f for f in model.selected_features_ if FEATURES[f].kind is FeatureKind.NUMERIC]
    columns = cohort.matrix(numeric)
    return TrainingDomain.from_training(
        {name: [float(v) for v in columns[:, j]] for j, name in enumerate(numeric)},
        b_values=info.fit_settings.b_values,
        field_strengths_t=info.field_strengths_t,
        vendors=info.vendors,
        note=info.domain_note,
    )


def build_card(trained: TrainedModel, cohort: Cohort, info: ModelInfo, onnx_sha256: str) -> dict:
    """The machine-readable card; every number in it is computed here, nothing typed in."""
    model = trained.multinomial
    inputs = [
        {
            "name": f,
            "kind": FEATURES[f].kind.value,
            "onnx_type": onnx_input_type(f),
            "shape": [None, 1],
            "unit": FEATURES[f].unit,
        }
        for f in model.selected_features_
    ]
    required = [f for f in model.selected_features_ if FEATURES[f].kind is FeatureKind.NUMERIC]
    if any(FEATURES[f].kind is FeatureKind.CATEGORICAL for f in model.selected_features_):
        required.insert(0, LESION_TYPE)
    by_type: dict[str, dict[str, int]] = {}
    for lt, label in zip(cohort.lesion_types, cohort.labels, strict=True):
        by_type.setdefault(str(lt) or "unknown", {}).setdefault(label, 0)
        by_type[str(lt) or "unknown"][label] += 1
    limitations = [
        "A statistical estimate of the HER2 group, not a pathology result: confirm HER2 status by "
        "IHC/ISH. Not a substitute for biopsy.",
        "Valid only for DKI features computed with the fit and discretisation settings listed "
        "under fit_settings; other b-values, fit methods or bin widths shift the features by as "
        "much as the differences between HER2 groups.",
        "Descriptors must be BI-RADS terms entered by a radiologist for the same lesion whose ROI "
        "gave the quantitative features.",
        "Performance is estimated by cross-validation on the training cohort; no external "
        "validation. Small subgroups (especially NME) have wide confidence intervals.",
        *info.extra_limitations,
    ]
    return {
        "card_version": CARD_VERSION,
        "name": info.name,
        "version": info.version,
        "variant": trained.variant.value,
        "reference": info.reference,
        "created": info.created,
        "intended_use": (
            "Estimate the likelihood that a breast cancer seen on MRI is HER2-low (IHC 1+, or 2+ "
            "without amplification) rather than HER2-zero or HER2-overexpressing, to flag cases "
            "for tumour-board review (e.g. biopsy HER2 0 while MRI suggests HER2-low). Decision "
            "support only; HER2 status is decided by pathology."
        ),
        "intended_users": ["radiologists", "tumour board (oncologists, pathologists)"],
        "out_of_scope": [
            "treatment decisions without IHC/ISH",
            "lesions that are not biopsy-proven invasive breast cancer",
            "features from other DKI protocols or fit settings",
        ],
        "training_data": {
            "description": info.training_data,
            "source": cohort.source,
            "sha256": cohort.sha256,
            "n": len(cohort),
            "counts": cohort.counts(),
            "by_lesion_type": by_type,
            "target": cohort.target,
            "provenance": info.provenance,
        },
        "classes": [str(c) for c in model.classes_],
        "positive_class": POSITIVE,
        "inputs": inputs,
        "required_inputs": required,
        "schema_version": SCHEMA_VERSION,
        "fit_settings": info.fit_settings.to_card(),
        "training_domain": training_domain(model, cohort, info).to_card(),
        "seed_paper": SEED_PAPER,
        "training": trained.config.to_dict(),
        "selection": model.selection_,
        "coefficients": coefficients(model),
        "contributions": CONTRIBUTION_METHOD,
        "performance": {
            "evaluation": (
                f"stratified {trained.config.cv_folds}-fold cross-validation (shuffled, seed "
                f"{trained.config.seed}), selection repeated in each fold; AUC by ranks; "
                f"95% CI = percentile bootstrap of out-of-fold predictions "
                f"({trained.config.n_bootstrap} resamples, numpy default_rng seed "
                f"{trained.config.seed})"
            ),
            "metrics": trained.performance,
        },
        "calibration": trained.calibration,
        "decision_curve": trained.decision_curve,
        "threshold": trained.threshold,
        "limitations": limitations,
        "onnx": {
            "file": "model.onnx",
            "sha256": onnx_sha256,
            "inputs": [i["name"] for i in inputs],
            "outputs": [OUTPUT_LABEL, OUTPUT_PROBABILITIES],
            "check_cases": _check_cases(model),
        },
        "software": {
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    }


def save_model(trained: TrainedModel, cohort: Cohort, out_dir: Path, info: ModelInfo) -> dict:
    """Write model.onnx, card.json, card.md and the plots; return the card."""
    from models.card import write_card

    out_dir.mkdir(parents=True, exist_ok=True)
    onx = to_onnx(
        trained.multinomial,
        doc_string=f"{info.name} {info.version} ({trained.variant.value}); see card.json",
    )
    data = onx.SerializeToString()
    (out_dir / "model.onnx").write_bytes(data)
    card = build_card(trained, cohort, info, hashlib.sha256(data).hexdigest())
    write_card(card, out_dir)
    return card


def train_and_save(
    cohort: Cohort, out_dir: Path, config: TrainingConfig, info: ModelInfo
) -> dict[str, Any]:
    """Train, evaluate, export and document one model."""
    return save_model(train(cohort, config), cohort, Path(out_dir), info)
