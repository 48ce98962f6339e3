"""The model card's numbers are the computed ones: recomputed here independently with sklearn."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from models.card import render_markdown
from models.data import Cohort, read_cohort_csv, write_cohort_csv
from models.estimator import Her2LowClassifier
from models.registry import reference_root
from models.simulate import simulate_cohort
from models.training import ModelInfo, TrainingConfig, train_and_save

FEATURES = (
    "lesion_type",
    "mass_shape",
    "mass_margin",
    "peritumoral_edema",
    "dapp_mean",
    "kapp_mean",
    "kapp_p95",
)
SEED = 7
N_BOOT = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, dict, Path]:
    tmp = tmp_path_factory.mktemp("card")
    write_cohort_csv(tmp / "cohort.csv", simulate_cohort(4))
    cohort = read_cohort_csv(tmp / "cohort.csv")
    config = TrainingConfig(features=FEATURES, n_bootstrap=N_BOOT, seed=SEED, cv_folds=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = train_and_save(cohort, tmp / "model", config, ModelInfo(name="t", version="1.0"))
    return cohort, card, tmp / "model"


def _oof_p_low(cohort: Cohort, idx: np.ndarray) -> np.ndarray:
    X, y = cohort.matrix(FEATURES)[idx], cohort.y[idx]
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    proba = cross_val_predict(Her2LowClassifier(FEATURES), X, y, cv=cv, method="predict_proba")
    return proba[:, list(np.unique(y)).index("low")]


def _bootstrap_ci(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    idx = np.random.default_rng(SEED).integers(0, len(y), size=(N_BOOT, len(y)))
    aucs = [roc_auc_score(y[i], s[i]) for i in idx if 0 < y[i].sum() < len(i)]
    lo, hi = np.quantile(aucs, [0.025, 0.975])
    return float(lo), float(hi)


def _metric(card: dict, task: str, subset: str) -> dict:
    return next(
        m for m in card["performance"]["metrics"] if (m["task"], m["subset"]) == (task, subset)
    )


def test_auc_and_ci_overall_and_by_lesion_type_are_recomputable(trained) -> None:  # type: ignore[no-untyped-def]
    cohort, card, _ = trained
    all_idx = np.arange(len(cohort))
    p_low = _oof_p_low(cohort, all_idx)
    is_low = cohort.y == "low"
    types = cohort.lesion_types
    for subset in ("all", "mass", "nme"):
        mask = np.ones(len(cohort), bool) if subset == "all" else types == subset
        m = _metric(card, "low_vs_rest", subset)
        assert m["n"] == int(mask.sum()) and m["n_positive"] == int(is_low[mask].sum())
        assert m["auc"] == pytest.approx(roc_auc_score(is_low[mask], p_low[mask]), abs=1e-12)
        lo, hi = _bootstrap_ci(is_low[mask], p_low[mask])
        assert (m["ci_low"], m["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
        assert m["ci_low"] < m["auc"] < m["ci_high"]
    # Binary low-vs-zero model, on low + zero cases only.
    idx = np.flatnonzero(np.isin(cohort.y, ["low", "zero"]))
    p = _oof_p_low(cohort, idx)
    m = _metric(card, "low_vs_zero", "all")
    assert m["n"] == len(idx)
    assert m["auc"] == pytest.approx(roc_auc_score(cohort.y[idx] == "low", p), abs=1e-12)


def test_threshold_calibration_and_decision_curve_are_recomputable(trained) -> None:  # type: ignore[no-untyped-def]
    cohort, card, _ = trained
    p_low = _oof_p_low(cohort, np.arange(len(cohort)))
    is_low = (cohort.y == "low").astype(int)
    fpr, tpr, thr = roc_curve(is_low, p_low)
    best = int(np.argmax((tpr - fpr)[1:])) + 1
    assert card["threshold"]["value"] == pytest.approx(thr[best], abs=1e-12)
    assert card["threshold"]["sensitivity"] == pytest.approx(tpr[best])
    assert card["calibration"]["brier"] == pytest.approx(brier_score_loss(is_low, p_low))
    frac, mean = calibration_curve(is_low, p_low, n_bins=5, strategy="quantile")
    np.testing.assert_allclose(card["calibration"]["observed_fraction"], frac)
    np.testing.assert_allclose(card["calibration"]["mean_predicted"], mean, rtol=1e-5)
    dc = card["decision_curve"]
    k = dc["thresholds"].index(0.3)
    flag = p_low >= 0.3
    n = len(p_low)
    nb = np.sum(flag & (is_low == 1)) / n - np.sum(flag & (is_low == 0)) / n * 0.3 / 0.7
    assert dc["net_benefit_model"][k] == pytest.approx(nb)
    prev = is_low.mean()
    assert dc["net_benefit_treat_all"][k] == pytest.approx(prev - (1 - prev) * 0.3 / 0.7)


def test_card_files_hash_counts_and_markdown(trained) -> None:  # type: ignore[no-untyped-def]
    cohort, card, model_dir = trained
    on_disk = json.loads((model_dir / "card.json").read_text())
    assert on_disk == card
    assert (
        card["onnx"]["sha256"]
        == hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    )
    assert card["training_data"]["counts"] == {"low": 91, "over": 81, "zero": 60}
    assert card["training_data"]["n"] == len(cohort) == 232
    assert card["reference"] is False and card["classes"] == ["low", "over", "zero"]
    assert card["onnx"]["inputs"] == list(FEATURES)
    assert card["required_inputs"] == ["lesion_type", "dapp_mean", "kapp_mean", "kapp_p95"]
    for png in ("calibration.png", "decision_curve.png"):
        assert (model_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (model_dir / "card.md").read_text()
    assert md == render_markdown(card)
    overall = _metric(card, "low_vs_rest", "all")
    assert f"{overall['auc']:.3f}" in md and f"{overall['ci_low']:.3f}" in md
    assert card["onnx"]["sha256"] in md and f"{card['threshold']['value']:.3f}" in md
    for section in (
        "Intended use",
        "Training data",
        "Inputs",
        "Performance",
        "Calibration",
        "Decision curve",
        "Operating threshold",
        "Limitations",
        "Version",
    ):
        assert f"## {section}" in md
    assert "IHC/ISH" in md


def test_reference_cards_say_simulated_and_not_validated() -> None:
    version_dir = reference_root() / "her2low-reference" / "0.1.0"
    variants = sorted(p.name for p in version_dir.iterdir())
    assert variants == ["combined", "descriptors", "quantitative"]
    for variant in variants:
        card = json.loads((version_dir / variant / "card.json").read_text())
        md = (version_dir / variant / "card.md").read_text()
        assert card["reference"] is True and card["variant"] == variant
        assert card["training_data"]["counts"] == {"low": 91, "over": 81, "zero": 60}
        assert "Not clinically validated" in md and "simulated data" in md
        assert "own labelled cases" in md
        digest = hashlib.sha256((version_dir / variant / "model.onnx").read_bytes()).hexdigest()
        assert card["onnx"]["sha256"] == digest


@pytest.mark.slow
def test_reference_build_is_reproducible(tmp_path: Path) -> None:
    from models.build_reference import build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build(tmp_path)
    shipped = reference_root() / "her2low-reference" / "0.1.0"
    for variant in ("combined", "descriptors", "quantitative"):
        new = json.loads((built / variant / "card.json").read_text())
        old = json.loads((shipped / variant / "card.json").read_text())
        assert new["onnx"]["sha256"] == old["onnx"]["sha256"]
        assert new["performance"] == old["performance"]
        assert new["threshold"] == old["threshold"]
