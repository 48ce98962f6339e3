"""Recalibration without retraining: a site's labelled cases remap P(HER2-low).

A model that ranks well at a new site can still be miscalibrated there (another scanner shifts
the features; another case mix shifts the base rate). Refitting only a monotone map of P(low) —
Platt (logistic on the logit) or isotonic — keeps the ONNX graph, its hash and its ranking (AUC)
and fixes the probabilities. The map is recorded in the card (``recalibration``) and applied by
the runtime after the graph; the operating threshold is mapped with it, so every case keeps the
side of the threshold it had. The card gets before/after calibration plots.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from models.data import read_cohort_csv

__all__ = ["METHODS", "CalibrationMap", "fit_map", "recalibrate"]

METHODS = ("platt", "isotonic")
_EPS = 1e-6
CALIBRATION_BEFORE_PNG = "calibration_before.png"
CALIBRATION_AFTER_PNG = "calibration_after.png"


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


@dataclass(frozen=True)
class CalibrationMap:
    """P(low) → recalibrated P(low). Platt: sigmoid(a·logit(p) + b); isotonic: x/y knots."""

    method: str
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "isotonic" and (len(self.x) < 1 or len(self.x) != len(self.y)):
            raise ValueError("an isotonic map needs matching x and y knots")

    def apply(self, p: float | np.ndarray) -> np.ndarray:
        values = np.asarray(p, dtype=np.float64)
        if self.method == "platt":
            return np.asarray(1.0 / (1.0 + np.exp(-(self.a * _logit(values) + self.b))))
        return np.asarray(np.interp(values, self.x, self.y))

    def to_card(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b}
        return {"method": "isotonic", "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> CalibrationMap | None:
        """The card's ``recalibration.map``; None for a model that was not recalibrated."""
        data = (card.get("recalibration") or {}).get("map")
        if not data:
            return None
        return cls(
            method=str(data["method"]),
            a=float(data.get("a", 1.0)),
            b=float(data.get("b", 0.0)),
            x=tuple(float(v) for v in data.get("x", ())),
            y=tuple(float(v) for v in data.get("y", ())),
        )


def fit_map(p_low: ArrayLike, is_low: ArrayLike, method: str) -> CalibrationMap:
    """Fit the map on a site's cases (raw model P(low) and whether each was HER2-low)."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(p_low, dtype=np.float64)
    y = np.asarray(is_low, dtype=bool)
    if p.size < 10 or y.all() or not y.any():
        raise ValueError("recalibration needs at least 10 labelled cases of both kinds")
    if method == "platt":
        lr = LogisticRegression(C=1e6).fit(_logit(p).reshape(-1, 1), y)
        return CalibrationMap("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        xs = tuple(float(v) for v in iso.X_thresholds_)
        ys = tuple(float(v) for v in iso.y_thresholds_)
        return CalibrationMap("isotonic", x=xs, y=ys)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def recalibrate(
    model_dir: Path, cohort_csv: Path, method: str, out_dir: Path, *, version: str | None = None
) -> dict[str, Any]:
    """Write a recalibrated copy of the model folder ``model_dir`` to ``out_dir``; its card."""
    from models.card import read_card, write_card
    from models.evaluation import calibration
    from models.runtime import ModelRuntime
    from models.training import POSITIVE

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = read_card(model_dir)
    if card.get("recalibration"):
        raise ValueError(f"{model_dir} is already recalibrated: start from the original model")
    runtime = ModelRuntime.load(model_dir)
    model = runtime.model(card["variant"])
    cohort = read_cohort_csv(cohort_csv)
    raw = model.run(list(cohort.rows))[:, model.low_index]
    is_low = np.asarray([label == POSITIVE for label in cohort.labels])
    mapping = fit_map(raw, is_low, method)
    after = mapping.apply(raw)
    before_cal = calibration(is_low, raw)
    after_cal = calibration(is_low, after)
    threshold = float(card["threshold"]["value"])
    # Monotone map: a case keeps its side of the threshold (isotonic steps can merge cases just
    # below it with those at it; the note says so).
    new_threshold = float(mapping.apply(threshold))
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / card["onnx"]["file"], out_dir / card["onnx"]["file"])
    original = {"name": card["name"], "version": card["version"]}
    card["version"] = version or f"{card['version']}-recal-{method}"
    card["threshold"] = {
        **card["threshold"],
        "value": new_threshold,
        "method": f"{card['threshold']['method']}, mapped by the {method} recalibration",
    }
    card["recalibration"] = {
        "method": method,
        "map": mapping.to_card(),
        "recalibrated_from": original,
        "cohort": {
            "source": cohort.source,
            "sha256": cohort.sha256,
            "n": len(cohort),
            "counts": cohort.counts(),
        },
        "before": before_cal,
        "after": after_cal,
        "threshold_before": threshold,
        "note": (
            "Only P(HER2-low) is remapped (monotone: ranking and AUC unchanged); the other "
            "classes are rescaled to sum to one. The threshold is mapped too (an isotonic "
            "step may merge cases just below it with those at it). Calibration is measured on the same site cases "
            "the map was fitted on (in-sample): validate on further cases."
        ),
    }
    write_card(card, out_dir)
    plot_recalibration(card, out_dir)
    return card


def plot_recalibration(card: Mapping[str, Any], out_dir: Path) -> None:
    """Before/after calibration plots on the site's cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = card["recalibration"]
    for key, name in (("before", CALIBRATION_BEFORE_PNG), ("after", CALIBRATION_AFTER_PNG)):
        cal = rec[key]
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
        ax.plot(cal["mean_predicted"], cal["observed_fraction"], marker="o", label=key)
        ax.set_xlabel("predicted P(HER2-low)")
        ax.set_ylabel("observed fraction HER2-low (site cases)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{card['name']} {card['version']}: {key} {rec['method']}", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / name, metadata={"Software": None})
        plt.close(fig)


def adjust(probabilities: np.ndarray, low_index: int, mapping: CalibrationMap) -> np.ndarray:
    """Class probabilities with P(low) remapped and the others rescaled to sum to one."""
    out = np.asarray(probabilities, dtype=np.float64).copy()
    raw = float(out[low_index])
    new = float(mapping.apply(raw))
    rest = 1.0 - raw
    others = [i for i in range(out.size) if i != low_index]
    if rest > 0 and math.isfinite(rest):
        out[others] *= (1.0 - new) / rest
    else:
        out[others] = (1.0 - new) / max(len(others), 1)
    out[low_index] = new
    return out


def summary(card: Mapping[str, Any]) -> str:
    """One line for the CLI."""
    rec = card["recalibration"]
    return json.dumps(
        {
            "version": card["version"],
            "method": rec["method"],
            "brier_before": rec["before"]["brier"],
            "brier_after": rec["after"]["brier"],
            "threshold": card["threshold"]["value"],
        }
    )
