"""Tumour-board review app: the blueprint and what its pages share (server-rendered).

No JavaScript; forms post back and re-render with every entered value on error, so nothing is
lost. Every page carries the "statistical estimate / reference model" banner. Every page needs a
signed-in user and every form a CSRF token (:mod:`cds_service.review.auth`); who entered or
decided is the session's user, never a form field.

Views live beside this module, one module per page family: :mod:`.worklist` (the worklist and
board-date view), :mod:`.case` (case page, descriptor entry, ROI confirmation, decision). They
import :data:`bp` from here and are imported at the bottom of this module so their routes register.
"""

from __future__ import annotations

from flask import Blueprint, abort, redirect, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service import display
from cds_service.review import auth
from cds_service.review.auth import login_required
from cds_service.state import state
from cds_service.store import BoardDecision, CaseSnapshot
from her2low.core.enums import LabelledEnum
from models.prediction import Prediction

bp = Blueprint(
    "review", __name__, url_prefix="/review", template_folder="templates", static_folder="static"
)


class BoardReason(LabelledEnum):
    """Coded reasons of a tumour-board decision."""

    RETEST_ADVISED = "retest-advised", "Estimate plausible: HER2 re-testing advised"
    PATHOLOGY_AVAILABLE = "pathology-available", "Definitive pathology HER2 result available"
    ROI_INCORRECT = "roi-incorrect", "Tumour ROI incorrect"
    DESCRIPTORS_CORRECTED = "descriptors-corrected", "Descriptors corrected"
    WRONG_LESION = "wrong-lesion", "Wrong lesion or wrong patient"
    OTHER = "other", "Other (see comment)"


DECISIONS = (
    (BoardDecision.CONFIRM, "Confirm the estimate (status unchanged)"),
    (BoardDecision.AMEND, "Amend (Observation status amended)"),
    (
        BoardDecision.ENTERED_IN_ERROR,
        "Withdraw (Observation entered-in-error; card no longer shown)",
    ),
)


def prediction_of(case: CaseSnapshot) -> Prediction | None:
    row = case.prediction
    return Prediction.from_dict(row.prediction) if row is not None and row.prediction else None


def fmt(name: str, value: str | float | None) -> str:
    """Pages show four significant digits and typeset units (cards: three, ASCII)."""
    return display.format_value(name, value, digits=4, typeset=True)


label = display.label


def load_case(result_id: str) -> CaseSnapshot:
    case = state().store.case(result_id)
    if case is None:
        abort(404, f"no case {result_id}")
    return case


def model_text(prediction: Prediction | None) -> str | None:
    if prediction is None:
        return None
    return f"{prediction.model_name} {prediction.model_version} ({prediction.variant.value})"


@bp.get("/model-card")
@login_required
def model_card() -> WerkzeugResponse:
    """The model cards moved to :mod:`.model_cards` (HTML per deployed version)."""
    return redirect(url_for("review.model_cards"), code=303)


auth.install(bp)

# Views register their routes on ``bp`` when imported (they import ``bp`` from this module).
from cds_service.review import (  # noqa: E402
    audit_export,
    case,
    concordance,
    model_cards,
    packet,
    worklist,
)

__all__ = [
    "BoardReason",
    "audit_export",
    "bp",
    "case",
    "concordance",
    "model_cards",
    "packet",
    "worklist",
]
