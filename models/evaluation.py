"""Honest performance numbers for a model card.

Everything is computed on out-of-fold predictions from stratified cross-validation (selection
included in each fold), so no number on a card comes from cases the model was fitted on.
Confidence intervals are percentile bootstraps over those out-of-fold predictions with a fixed
seed, so the card can be recomputed exactly (the tests do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict

POSITIVE = "low"
DECISION_THRESHOLDS: tuple[float, ...] = tuple(
    round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05)
)


@dataclass(frozen=True)
class Task:
    """A discrimination task: positives vs negatives, scored by one model's P(positive)."""

    name: str  # e.g. "low_vs_rest"
    model: str  # "multinomial" | "low_vs_zero" | "low_vs_over"
    negatives: tuple[str, ...]


TASKS: tuple[Task, ...] = (
    Task("low_vs_rest", "multinomial", ("zero", "over")),
    Task("low_vs_zero", "low_vs_zero", ("zero",)),
    Task("low_vs_over", "low_vs_over", ("over",)),
)
SUBSETS: tuple[str, ...] = ("all", "mass", "nme")


def cv_splitter(n_splits: int, seed: int) -> StratifiedKFold:
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def oof_proba(
    estimator: BaseEstimator, X: np.ndarray, y: np.ndarray, *, n_splits: int, seed: int
) -> np.ndarray:
    """Out-of-fold class probabilities (columns in sorted class order, as ``classes_``)."""
    folds = min(n_splits, int(np.min(np.unique(y, return_counts=True)[1])))
    if folds < 2:
        raise ValueError("every class needs at least 2 cases for cross-validation")
    return np.asarray(
        cross_val_predict(
            clone(estimator), X, y, cv=cv_splitter(folds, seed), method="predict_proba"
        )
    )


def auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula, ties counted half."""
    y_true = np.asarray(y_true, dtype=bool)
    n1 = int(y_true.sum())
    n0 = len(y_true) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y_true].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The resamples behind every CI: [n_boot, n] indices from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_auc_ci(
    y_true: np.ndarray, score: np.ndarray, *, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float, int]:
    """Percentile bootstrap CI of the AUC; resamples lacking a class are skipped (count returned)."""
    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=float)
    idx = bootstrap_indices(len(y_true), n_boot, seed)
    yb = y_true[idx]
    ranks = rankdata(score[idx], axis=1)
    n1 = yb.sum(axis=1)
    n0 = yb.shape[1] - n1
    ok = (n1 > 0) & (n0 > 0)
    if not ok.any():
        return float("nan"), float("nan"), 0
    aucs = ((ranks * yb).sum(axis=1)[ok] - n1[ok] * (n1[ok] + 1) / 2) / (n1[ok] * n0[ok])
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi), int(ok.sum())


def calibration(y_true: np.ndarray, prob: np.ndarray, *, n_bins: int = 5) -> dict[str, Any]:
    """Reliability curve (quantile bins), Brier score, and logistic recalibration slope/intercept."""
    y_true = np.asarray(y_true, dtype=int)
    prob = np.clip(np.asarray(prob, dtype=float), 1e-6, 1 - 1e-6)
    frac_pos, mean_pred = calibration_curve(y_true, prob, n_bins=n_bins, strategy="quantile")
    logit = np.log(prob / (1 - prob)).reshape(-1, 1)
    recal = LogisticRegression(C=1e6, max_iter=1000).fit(logit, y_true)
    return {
        "positive_class": POSITIVE,
        "n_bins": n_bins,
        "strategy": "quantile",
        "mean_predicted": [float(v) for v in mean_pred],
        "observed_fraction": [float(v) for v in frac_pos],
        "brier": float(brier_score_loss(y_true, prob)),
        "slope": float(recal.coef_[0, 0]),
        "intercept": float(recal.intercept_[0]),
    }


def decision_curve(
    y_true: np.ndarray, prob: np.ndarray, thresholds: Sequence[float] = DECISION_THRESHOLDS
) -> dict[str, Any]:
    """Net benefit of acting on ``prob >= pt`` vs acting on all / none (Vickers & Elkin 2006)."""
    y_true = np.asarray(y_true, dtype=bool)
    prob = np.asarray(prob, dtype=float)
    n = len(y_true)
    prevalence = float(y_true.mean())
    model, treat_all = [], []
    for pt in thresholds:
        flag = prob >= pt
        tp = float(np.sum(flag & y_true)) / n
        fp = float(np.sum(flag & ~y_true)) / n
        odds = pt / (1 - pt)
        model.append(tp - fp * odds)
        treat_all.append(prevalence - (1 - prevalence) * odds)
    return {
        "positive_class": POSITIVE,
        "thresholds": [float(t) for t in thresholds],
        "net_benefit_model": model,
        "net_benefit_treat_all": treat_all,
        "net_benefit_treat_none": [0.0] * len(thresholds),
    }


def youden_threshold(y_true: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Operating point maximising sensitivity + specificity - 1 on out-of-fold P(low)."""
    fpr, tpr, thr = roc_curve(np.asarray(y_true, dtype=int), prob)
    finite = np.isfinite(thr)
    j = tpr - fpr
    j[~finite] = -np.inf
    best = int(np.argmax(j))
    return {
        "value": float(thr[best]),
        "method": "Youden's J on out-of-fold P(HER2-low), HER2-low vs zero+over",
        "sensitivity": float(tpr[best]),
        "specificity": float(1 - fpr[best]),
    }


@dataclass(frozen=True)
class TaskScores:
    """Out-of-fold P(low) of one task's cases: cohort indices, positive indicator, score."""

    task: Task
    index: np.ndarray
    positive: np.ndarray
    score: np.ndarray


def performance_rows(
    scores: Sequence[TaskScores], lesion_types: np.ndarray, *, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """AUC with bootstrap CI for every task x subset (all, mass, NME).

    Every CI uses the same ``seed``: the resamples are reproducible from the card alone.
    """
    rows: list[dict[str, Any]] = []
    for ts in scores:
        for subset in SUBSETS:
            if subset == "all":
                mask = np.ones(len(ts.index), dtype=bool)
            else:
                mask = lesion_types[ts.index] == subset
            yt, sc = ts.positive[mask], ts.score[mask]
            n_pos = int(yt.sum())
            row: dict[str, Any] = {
                "task": ts.task.name,
                "model": ts.task.model,
                "subset": subset,
                "n": int(mask.sum()),
                "n_positive": n_pos,
                "auc": None,
                "ci_low": None,
                "ci_high": None,
            }
            if 0 < n_pos < len(yt):
                row["auc"] = auc(yt, sc)
                lo, hi, used = bootstrap_auc_ci(yt, sc, n_boot=n_boot, seed=seed)
                row.update(ci_low=lo, ci_high=hi, bootstrap_resamples_used=used)
            rows.append(row)
    return rows
