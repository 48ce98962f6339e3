"""Minimal tumour-board pages: worklist, case, descriptor form, model card (server-rendered).

No JavaScript; forms post back and re-render with every entered value on error, so nothing is
lost. Every page carries the "statistical estimate / reference model" banner. Every page needs a
signed-in user and every form a CSRF token (:mod:`cds_service.review.auth`); who entered or
decided is the session's user, never a form field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service import display
from cds_service.accounts import Permission
from cds_service.review import auth
from cds_service.review.auth import login_required, permission_required, signed_in_user
from cds_service.schema import validate_descriptor_values
from cds_service.state import state
from cds_service.store import BoardDecision, CaseSnapshot, NotFoundError
from models import schema as feature_schema
from models.prediction import Prediction

bp = Blueprint(
    "review", __name__, url_prefix="/review", template_folder="templates", static_folder="static"
)


class BoardReason(StrEnum):
    """Coded reasons of a tumour-board decision."""

    RETEST_ADVISED = "retest-advised"
    PATHOLOGY_AVAILABLE = "pathology-available"
    ROI_INCORRECT = "roi-incorrect"
    DESCRIPTORS_CORRECTED = "descriptors-corrected"
    WRONG_LESION = "wrong-lesion"
    OTHER = "other"

    @property
    def display(self) -> str:
        return {
            BoardReason.RETEST_ADVISED: "Estimate plausible: HER2 re-testing advised",
            BoardReason.PATHOLOGY_AVAILABLE: "Definitive pathology HER2 result available",
            BoardReason.ROI_INCORRECT: "Tumour ROI incorrect",
            BoardReason.DESCRIPTORS_CORRECTED: "Descriptors corrected",
            BoardReason.WRONG_LESION: "Wrong lesion or wrong patient",
            BoardReason.OTHER: "Other (see comment)",
        }[self]


_DECISIONS = (
    (BoardDecision.CONFIRM, "Confirm the estimate (status unchanged)"),
    (BoardDecision.AMEND, "Amend (Observation status amended)"),
    (
        BoardDecision.ENTERED_IN_ERROR,
        "Withdraw (Observation entered-in-error; card no longer shown)",
    ),
)


def _prediction(case: CaseSnapshot) -> Prediction | None:
    row = case.prediction
    return Prediction.from_dict(row.prediction) if row is not None and row.prediction else None


def _fmt(name: str, value: str | float | None) -> str:
    """Pages show four significant digits and typeset units (cards: three, ASCII)."""
    return display.format_value(name, value, digits=4, typeset=True)


_label = display.label


def _descriptor_fields() -> list[dict[str, Any]]:
    fields = []
    for spec in feature_schema.DESCRIPTORS:
        applies = ""
        if tuple(spec.applies_to) != tuple(feature_schema.ALL_LESION_TYPES):
            applies = "only for " + " / ".join(
                t.value.upper() if t.value == "nme" else t.value for t in spec.applies_to
            )
        if spec.optional:
            applies = (applies + ", optional").lstrip(", ")
        fields.append(
            {
                "name": spec.name,
                "label": spec.label,
                "options": list(zip(spec.values, spec.value_labels, strict=True)),
                "applies": applies,
            }
        )
    return fields


def _render_case(
    case: CaseSnapshot,
    *,
    form: MultiDict[str, str] | dict[str, str],
    errors: list[str],
    saved: bool,
    status: int,
    board_errors: list[str] | None = None,
) -> tuple[str, int]:
    st = state()
    prediction = _prediction(case)
    provenance = case.provenance
    qc = provenance.qc if provenance else None
    features = [
        {"label": _label(n), "value": _fmt(n, case.features[n])}
        for n in feature_schema.QUANTITATIVE_NAMES
        if n in case.features
    ]
    html = render_template(
        "review_case.html",
        case=case,
        reference=prediction.reference if prediction else True,
        side=display.side(case.result.laterality, "not recorded"),
        roi=provenance.roi if provenance else None,
        qc_flags=qc.flags.raised() if qc else {},
        qc_problems=list(qc.problems) if qc else [],
        previews=case.revision.previews or {},
        prediction=prediction,
        variant_text=display.VARIANT_TEXT[prediction.variant] if prediction else "",
        used=", ".join(_label(n) for n in prediction.inputs_used) if prediction else "",
        missing=", ".join(_label(n) for n in prediction.inputs_missing) if prediction else "",
        contributions=[
            {"label": _label(c.feature), "value": _fmt(c.feature, c.value), "log_odds": c.log_odds}
            for c in (prediction.contributions if prediction else ())
        ],
        features=features,
        descriptor_fields=_descriptor_fields(),
        decisions=[(d.value, label) for d, label in _DECISIONS],
        reasons=[(r.value, r.display) for r in BoardReason],
        board_errors=board_errors,
        form=form,
        errors=errors,
        saved=saved,
        feedback=st.store.feedback_for(case.result.id),
        audit=st.store.audit_for(case.result.id),
    )
    return html, status


def _load(result_id: str) -> CaseSnapshot:
    case = state().store.case(result_id)
    if case is None:
        abort(404, f"no case {result_id}")
    return case


def _model_text(prediction: Prediction | None) -> str | None:
    if prediction is None:
        return None
    return f"{prediction.model_name} {prediction.model_version} ({prediction.variant.value})"


@bp.get("/", strict_slashes=False)
@login_required
def worklist() -> str:
    st = state()
    discordant = st.store.discordant_results()
    rows = []
    for case in st.store.worklist():
        prediction = _prediction(case)
        rows.append(
            {
                "id": case.result.id,
                "acquired": case.result.acquired_at.strftime("%Y-%m-%d"),
                "side": display.side(case.result.laterality, "—"),
                "percent": prediction.probability * 100 if prediction else None,
                "above": prediction.above_threshold if prediction else False,
                "model": _model_text(prediction),
                "status": case.prediction.observation_status if case.prediction else "no estimate",
                "descriptors": case.descriptors is not None,
                "flag": case.result.review_flag,
                "discordance": case.result.id in discordant,
            }
        )
    return render_template("review_worklist.html", rows=rows, reference=True)


@bp.get("/cases/<result_id>")
@login_required
def case(result_id: str) -> tuple[str, int]:
    snapshot = _load(result_id)
    form: dict[str, str] = dict(snapshot.descriptors.values) if snapshot.descriptors else {}
    if snapshot.descriptors and snapshot.descriptors.roi_confirmed:
        form["roi_confirmed"] = "yes"
    state().store.audit(signed_in_user().username, "case-viewed", result_id)
    return _render_case(
        snapshot, form=form, errors=[], saved=request.args.get("saved") == "1", status=200
    )


@bp.post("/cases/<result_id>/descriptors")
@permission_required(Permission.ENTER_DESCRIPTORS)
def save_descriptors(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    snapshot = _load(result_id)
    form = request.form
    errors: list[str] = []
    entered_by = signed_in_user().username
    raw = {spec.name: form.get(spec.name) or None for spec in feature_schema.DESCRIPTORS}
    values: dict[str, str] = {}
    try:
        values = validate_descriptor_values(raw)
    except feature_schema.FeatureValidationError as exc:
        errors.append(f"{_label(exc.feature)}: {exc.message}")
    if not errors:
        lesion = values.get(feature_schema.LESION_TYPE, "")
        if not lesion and values:
            errors.append("Lesion type: choose mass or non-mass enhancement first.")
        missing = [
            spec.label
            for spec in feature_schema.DESCRIPTORS
            if not spec.optional
            and spec.name not in values
            and (not lesion or feature_schema.applies(spec.name, lesion))
        ]
        if missing and not form.get("allow_partial"):
            errors.append(
                "Not entered: " + ", ".join(missing) + ". Enter them, or tick "
                "“Save although some descriptors are not entered”."
            )
    if errors:
        return _render_case(snapshot, form=form, errors=errors, saved=False, status=422)
    st = state()
    try:
        st.store.add_descriptors(result_id, values, bool(form.get("roi_confirmed")), entered_by)
    except NotFoundError:
        abort(404, f"no case {result_id}")
    st.predictions.recompute(result_id)
    return redirect(url_for("review.case", result_id=result_id, saved=1) + "#descriptors", code=303)


@bp.post("/cases/<result_id>/decision")
@permission_required(Permission.RECORD_DECISION)
def board_decision(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """Tumour-board accept/override with a coded reason; the Observation status follows."""
    snapshot = _load(result_id)
    form = request.form
    errors: list[str] = []
    decision: BoardDecision | None = None
    reason: BoardReason | None = None
    try:
        decision = BoardDecision(form.get("decision", ""))
    except ValueError:
        errors.append("Decision: choose confirm, amend or withdraw.")
    try:
        reason = BoardReason(form.get("reason", ""))
    except ValueError:
        errors.append("Reason: choose a coded reason.")
    reviewer = signed_in_user().username
    comment = (form.get("comment") or "").strip()[:2000]
    if errors or decision is None or reason is None:
        current = dict(snapshot.descriptors.values) if snapshot.descriptors else {}
        return _render_case(
            snapshot, form=current, errors=[], saved=False, status=422, board_errors=errors
        )
    st = state()
    st.store.board_decision(result_id, decision, reason.value, comment, reviewer)
    st.predictions.recompute(result_id)
    return redirect(url_for("review.case", result_id=result_id) + "#decision", code=303)


@bp.get("/model-card")
@login_required
def model_card() -> str:
    text = state().runtime.model_card
    return render_template("review_model_card.html", card_text=text, reference=True)


auth.install(bp)
