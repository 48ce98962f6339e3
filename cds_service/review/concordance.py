"""Concordance: the model's estimates against later pathology HER2 results, and feature drift.

Pathology results come from a pathologist's form on the review app or from a FHIR Observation
the EHR sends in the CDS Hooks ``her2`` prefetch (:func:`record_from_prefetch`: the reading of
:mod:`cds_service.biopsy`, kept when it is dated after the MRI). The page shows

- counts of pathology groups by likelihood band,
- a calibration plot (predicted P(HER2-low) against the observed fraction HER2-low, beside the
  training data's out-of-fold curve from the model card), server-rendered PNG, no script,
- per scanner (``provenance.scanner``) how often each feature falls outside the central 90 % of
  the training data (its p5–p95 reference range): a site sees when the model stops fitting its
  scanners.

Reference ranges: a card's ``reference_ranges`` (``{feature: [p5, p95]}``) when it has them;
cards of the simulated reference model record the generator and seed, so the training cohort is
regenerated once per process and its ranges computed.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flask import Response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service import display
from cds_service.accounts import Permission
from cds_service.audit import AuditAction
from cds_service.pathology import parse_date
from cds_service.review import bp, load_case
from cds_service.review.auth import login_required, permission_required, signed_in_user
from cds_service.review.model_cards import deployed_entries
from cds_service.state import ServiceState, state
from cds_service.store import ConcordanceRow, Her2Pathology, PathologySource, Store
from models import schema as feature_schema
from models.contract import Provenance
from models.registry import ModelEntry, RegistryError

#: Likelihood bands of the counts table (upper bound exclusive, the last one inclusive).
BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
#: Features whose drift the page shows (the location statistics people read first).
DRIFT_FEATURES: tuple[str, ...] = (
    "adc_mean",
    "dapp_mean",
    "kapp_mean",
    "adc_p95",
    "dapp_p95",
    "kapp_p95",
)
#: Outside the training p5–p95 range: expected 10 %; flagged from this fraction on.
DRIFT_FLAG = 0.3
DRIFT_MIN_CASES = 5


#: The pathologist's form: (value, label) -> (group, IHC score text).
PATHOLOGY_CHOICES: dict[str, tuple[Her2Pathology, str, str]] = {
    "0": (Her2Pathology.ZERO, "0", "HER2 0 (IHC 0)"),
    "1+": (Her2Pathology.LOW, "1+", "HER2-low: IHC 1+"),
    "2+ish-": (Her2Pathology.LOW, "2+ ISH-", "HER2-low: IHC 2+, ISH not amplified"),
    "2+ish+": (Her2Pathology.POSITIVE, "2+ ISH+", "HER2-positive: IHC 2+, ISH amplified"),
    "3+": (Her2Pathology.POSITIVE, "3+", "HER2-positive: IHC 3+"),
}

# --- reference ranges of the training data -------------------------------------------------------


def _percentiles(
    rows: Iterable[Mapping[str, Any]], names: Sequence[str]
) -> dict[str, tuple[float, float]]:
    out = {}
    for name in names:
        values = np.array(
            [
                float(v)
                for r in rows
                if isinstance(v := r.get(name), int | float) and math.isfinite(v)
            ]
        )
        if values.size:
            out[name] = (float(np.percentile(values, 5)), float(np.percentile(values, 95)))
    return out


@functools.lru_cache(maxsize=4)
def _simulated_ranges(seed: int) -> dict[str, tuple[float, float]]:
    from models.simulate import simulate_cohort

    rows = simulate_cohort(seed=seed)
    return _percentiles(rows, feature_schema.QUANTITATIVE_NAMES)


def reference_ranges(card: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """p5–p95 of each feature in the model's training data (see the module docstring)."""
    given = card.get("reference_ranges")
    if isinstance(given, Mapping):
        return {str(k): (float(v[0]), float(v[1])) for k, v in given.items()}
    provenance = card.get("training_data", {}).get("provenance", {})
    if provenance.get("generator") == "models.simulate.simulate_cohort":
        return _simulated_ranges(int(provenance.get("seed", 0)))
    return {}


def _current_entry(st: ServiceState) -> ModelEntry | None:
    try:
        entries = deployed_entries(st.settings.model_dir)
    except RegistryError:
        return None
    return entries[-1] if entries else None


# --- the numbers ------------------------------------------------------------------------------------


def band_of(p: float) -> int:
    for k, (low, high) in enumerate(BANDS):
        if low <= p < high:
            return k
    return len(BANDS) - 1


def band_counts(rows: Sequence[ConcordanceRow]) -> list[dict[str, Any]]:
    """Pathology groups per likelihood band (cases without an estimate are left out)."""
    table = []
    for k, (low, high) in enumerate(BANDS):
        in_band = [r for r in rows if r.probability is not None and band_of(r.probability) == k]
        counts = {g.value: sum(r.her2 is g for r in in_band) for g in Her2Pathology}
        table.append({"band": f"{low * 100:.0f}–{high * 100:.0f} %", "n": len(in_band), **counts})
    return table


@dataclass(frozen=True)
class CalibrationBin:
    mean_predicted: float
    observed_low: float
    n: int


def calibration_bins(rows: Sequence[ConcordanceRow], n_bins: int = 5) -> list[CalibrationBin]:
    """Fixed-width bins of predicted P(HER2-low) with the observed fraction pathology HER2-low."""
    bins = []
    scored = [r for r in rows if r.probability is not None]
    for k in range(n_bins):
        low, high = k / n_bins, (k + 1) / n_bins
        inside = [
            r
            for r in scored
            if r.probability is not None
            and (low <= r.probability < high or (k == n_bins - 1 and r.probability == 1.0))
        ]
        if inside:
            bins.append(
                CalibrationBin(
                    float(np.mean([r.probability for r in inside])),
                    sum(r.her2 is Her2Pathology.LOW for r in inside) / len(inside),
                    len(inside),
                )
            )
    return bins


def calibration_png(bins: Sequence[CalibrationBin], card: Mapping[str, Any] | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    cal = (card or {}).get("calibration") or {}
    if cal.get("mean_predicted"):
        ax.plot(
            cal["mean_predicted"],
            cal["observed_fraction"],
            marker="s",
            color="#999999",
            label="training data (out of fold)",
        )
    if bins:
        ax.plot(
            [b.mean_predicted for b in bins],
            [b.observed_low for b in bins],
            marker="o",
            label="this site (later pathology)",
        )
        for b in bins:
            ax.annotate(f"n={b.n}", (b.mean_predicted, b.observed_low), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(HER2-low)")
    ax.set_ylabel("observed fraction HER2-low (pathology)")
    ax.set_title("Calibration against later pathology", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def scanner_of(provenance: Mapping[str, Any]) -> str:
    stored = Provenance.stored(provenance)
    if stored is None or stored.scanner is None:
        return "scanner not stated"
    return stored.scanner.label


def drift(
    feature_rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    ranges: Mapping[str, tuple[float, float]],
) -> list[dict[str, Any]]:
    """Per scanner: cases, and per feature the median and the fraction outside p5–p95."""
    by_scanner: dict[str, list[Mapping[str, Any]]] = {}
    for features, provenance in feature_rows:
        by_scanner.setdefault(scanner_of(provenance), []).append(features)
    table = []
    for scanner, rows in sorted(by_scanner.items()):
        cells: list[dict[str, Any]] = []
        for name in DRIFT_FEATURES:
            values = [
                float(v)
                for r in rows
                if isinstance(v := r.get(name), int | float) and math.isfinite(v)
            ]
            if name not in ranges or not values:
                cells.append({"name": name, "median": "—", "outside": None, "flag": False})
                continue
            low, high = ranges[name]
            outside = sum(v < low or v > high for v in values) / len(values)
            cells.append(
                {
                    "name": name,
                    "median": display.format_value(
                        name, float(np.median(values)), digits=3, typeset=True
                    ),
                    "outside": outside,
                    "flag": outside >= DRIFT_FLAG and len(values) >= DRIFT_MIN_CASES,
                }
            )
        table.append({"scanner": scanner, "n": len(rows), "cells": cells})
    return table


# --- views --------------------------------------------------------------------------------------------


def _card() -> Mapping[str, Any] | None:
    entry = _current_entry(state())
    return entry.card if entry else None


@bp.get("/concordance")
@login_required
def concordance() -> str:
    """Counts by band, the calibration plot and the drift table."""
    st = state()
    rows = st.store.concordance_rows()
    card = _card()
    ranges = reference_ranges(card) if card else {}
    st.store.audit(signed_in_user().username, AuditAction.CONCORDANCE_VIEWED, None)
    return render_template(
        "review_concordance.html",
        n=len(rows),
        n_scored=sum(r.probability is not None for r in rows),
        bands=band_counts(rows),
        groups=list(Her2Pathology),
        bins=calibration_bins(rows),
        drift=drift(st.store.feature_rows(), ranges),
        drift_features=[display.label(n) for n in DRIFT_FEATURES],
        ranges=[
            {
                "label": display.label(n),
                "low": display.format_value(n, ranges[n][0], typeset=True),
                "high": display.format_value(n, ranges[n][1], typeset=True),
            }
            for n in DRIFT_FEATURES
            if n in ranges
        ],
        flag=DRIFT_FLAG,
        reference=True,
    )


@bp.get("/concordance/calibration.png")
@login_required
def concordance_calibration() -> Response:
    """The calibration plot (PNG, drawn on the server)."""
    png = calibration_png(calibration_bins(state().store.concordance_rows()), _card())
    return Response(png, mimetype="image/png")


def _pathology_page(
    result_id: str, *, error: str | None, status: int, form: Mapping[str, str]
) -> tuple[str, int]:
    case = load_case(result_id)
    reports = state().store.pathology_for(result_id)
    html = render_template(
        "review_pathology.html",
        case=case,
        reports=[
            {
                "her2": Her2Pathology(r.her2).display,
                "score": r.score,
                "source": PathologySource(r.source).value,
                "by": r.entered_by,
                "reported": f"{r.reported_at:%Y-%m-%d}",
                "comment": r.comment or "",
            }
            for r in reports
        ],
        choices=[(value, text) for value, (_, _, text) in PATHOLOGY_CHOICES.items()],
        error=error,
        form=form,
        reference=True,
    )
    return html, status


@bp.get("/cases/<result_id>/pathology")
@login_required
def pathology(result_id: str) -> tuple[str, int]:
    """The case's pathology HER2 results, and the pathologist's form."""
    return _pathology_page(result_id, error=None, status=200, form={})


@bp.post("/cases/<result_id>/pathology")
@permission_required(Permission.ENTER_PATHOLOGY)
def enter_pathology(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """Record a pathology HER2 result (who: the signed-in pathologist)."""
    load_case(result_id)
    form = request.form
    choice = PATHOLOGY_CHOICES.get(form.get("her2", ""))
    reported = parse_date(form.get("reported", ""))
    error = None
    if choice is None:
        error = "HER2 result: choose one of the listed results."
    elif reported is None or reported > datetime.now(UTC):
        error = "Report date: enter the pathology report's date (YYYY-MM-DD), not in the future."
    if error or choice is None or reported is None:
        return _pathology_page(result_id, error=error, status=422, form=dict(form))
    her2, score, _ = choice
    user = signed_in_user().username
    comment = (form.get("comment") or "").strip()[:2000] or None
    st = state()
    stored = st.store.add_pathology(
        result_id,
        her2,
        score=score,
        source=PathologySource.PATHOLOGIST,
        source_key=f"form:{user}:{reported:%Y-%m-%d}:{score}:{datetime.now(UTC).isoformat()}",
        entered_by=user,
        reported_at=reported,
        comment=comment,
    )
    assert stored
    return redirect(url_for("review.pathology", result_id=result_id), code=303)


def pathology_summary(store: Store, result_id: str) -> str | None:
    """The latest pathology HER2 result of a case in words (case page, packet)."""
    reports = store.pathology_for(result_id)
    if not reports:
        return None
    r = reports[0]
    return f"{Her2Pathology(r.her2).display} ({r.score or 'score not stated'}, {r.reported_at:%Y-%m-%d}, {r.source})"
