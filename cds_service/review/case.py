"""The case page, descriptor entry, ROI confirmation, board date and the tumour-board decision.

The page reads top to bottom the way a board discusses a case: whose case it is, the likelihood
(large, with its threshold, model variant, inputs and the reference-model warning) and the
discordance banner; then the evidence (high-b DWI with the ROI outline and the Dapp / Kapp / ADC
maps slice by slice, histograms, the training reference ranges, the feature table, the
per-feature contributions, QC flags in words, pathology, the PACS link and where the result
objects sent to the PACS stand); then the acts
(confirm ROI, descriptors, board date, decision) and the trail. Images are served from their
own URL (``/previews/<name>.png``) out of a per-worker cache, so the page itself stays small.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections import OrderedDict
from datetime import date
from typing import Any

from flask import Response, abort, redirect, render_template, request, session, url_for
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service import display
from cds_service.accounts import Permission
from cds_service.cards import PredictionBasis
from cds_service.case_state import CaseState
from cds_service.predictions import RuntimeUnavailableError
from cds_service.review import (
    DECISIONS,
    BoardReason,
    bp,
    fmt,
    label,
    load_case,
    prediction_of,
)
from cds_service.review.auth import login_required, permission_required, signed_in_user
from cds_service.schema import validate_descriptor_values
from cds_service.state import state
from cds_service.store import BoardDecision, CaseSnapshot, Her2Pathology, NotFoundError
from models import schema as feature_schema
from models.contract import ExportState, ExportStatus
from models.prediction import Prediction

#: Map previews the node publishes per ROI slice: ``<map>_slice_<k>`` (k: 0-based slice index).
MAPS = (("dwi", "High-b DWI"), ("adc", "ADC"), ("dapp", "Dapp"), ("kapp", "Kapp"))
_SLICE_NAME = re.compile(r"^(dwi|adc|dapp|kapp)_slice_(\d{1,4})$")

#: QC flags (``models.contract.QcFlags``) in words.
QC_WORDS = {
    "at_bound": "ROI voxels where the DKI fit stopped at a bound of the allowed Dapp/Kapp range: "
    "their values are limits, not measurements",
    "dk_bmax": "ROI voxels with Dapp·Kapp·b_max ≥ 3, where the kurtosis model no longer holds",
    "low_signal": "ROI voxels whose high-b signal is near the noise floor: fit unreliable",
    "background": "ROI voxels classified as background (air, no signal): not fitted",
}

_CHANGE_KEY = "likelihood_change"

#: The node's export states (``models.contract.ExportState``) in words, for "Results in the PACS".
EXPORT_WORDS = {
    ExportState.PENDING: "waiting to be sent",
    ExportState.SENDING: "being sent (retrying after a failure if attempts > 1)",
    ExportState.DONE: "in the PACS",
    ExportState.DEAD: "NOT DELIVERED — retries exhausted (dead letter)",
}


# --- preview images ---------------------------------------------------------------------------


class _PreviewCache:
    """Decoded PNGs of recently viewed cases, per worker (a case's revision never changes)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int], dict[str, bytes]] = OrderedDict()

    def get(self, key: tuple[str, int]) -> dict[str, bytes] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, int], images: dict[str, bytes]) -> None:
        with self._lock:
            self._items[key] = images
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


PREVIEWS = _PreviewCache()


def _decoded(case: CaseSnapshot) -> dict[str, bytes]:
    key = (case.result.id, case.revision.revision)
    images = PREVIEWS.get(key)
    if images is None:
        images = {}
        for name, data in (case.revision.previews or {}).items():
            try:
                images[name] = base64.b64decode(data, validate=True)
            except (binascii.Error, TypeError, ValueError):
                continue
        PREVIEWS.put(key, images)
    return images


def _slices(names: list[str]) -> dict[int, dict[str, str]]:
    """Per slice index: map → preview name (from the ``<map>_slice_<k>`` names)."""
    out: dict[int, dict[str, str]] = {}
    for name in names:
        m = _SLICE_NAME.match(name)
        if m:
            out.setdefault(int(m.group(2)), {})[m.group(1)] = name
    return dict(sorted(out.items()))


def _evidence(case: CaseSnapshot, requested: str | None) -> dict[str, Any]:
    names = sorted((case.revision.previews or {}).keys())
    slices = _slices(names)
    current: int | None = None
    if slices:
        try:
            current = int(requested) if requested is not None else None
        except ValueError:
            current = None
        if current not in slices:
            # the ROI's largest cross-section: the slice the node also rendered as "<map>_slice"
            current = list(slices)[len(slices) // 2]
    used = {n for per in slices.values() for n in per.values()}
    histograms = [n for n in names if n.endswith("_histogram")]
    legacy = {f"{m}_slice" for m, _ in MAPS} if slices else set()  # = a numbered one
    other = [n for n in names if n not in used and n not in histograms and n not in legacy]
    order = [k for k in slices]
    position = order.index(current) if current is not None else 0
    return {
        "slices": slices,
        "slice": current,
        "slice_maps": [(m, text, slices[current].get(m)) for m, text in MAPS]
        if current is not None
        else [],
        "prev_slice": order[position - 1] if current is not None and position > 0 else None,
        "next_slice": order[position + 1]
        if current is not None and position + 1 < len(order)
        else None,
        "histograms": histograms,
        "other": other,
    }


@bp.get("/cases/<result_id>/previews/<name>.png")
@login_required
def preview(result_id: str, name: str) -> Response:
    """One preview PNG of a case (signed-in users only; the name is the payload's key).

    Served from the worker's cache when the case's current revision is in it (one light read),
    otherwise decoded from the stored payload once.
    """
    revision = state().store.current_revision(result_id)
    if revision is None:
        abort(404, f"no case {result_id}")
    images = PREVIEWS.get((result_id, revision))
    if images is None:
        images = _decoded(load_case(result_id))
    png = images.get(name)
    if png is None:
        abort(404, "no such preview")
    return Response(png, mimetype="image/png")


# --- what the page shows ----------------------------------------------------------------------


def _reference_ranges(prediction: Prediction | None) -> dict[str, tuple[float, float]]:
    """Training mean and SD of each numeric model input (the model card's standardisation)."""
    if prediction is None:
        return {}
    try:
        cards = getattr(state().runtime.get(), "cards", None)  # ModelRuntime.cards (property)
    except RuntimeUnavailableError:
        return {}
    if not isinstance(cards, dict):
        return {}  # a predictor without cards (tests' fakes)
    card = cards.get(prediction.variant) or {}
    ranges: dict[str, tuple[float, float]] = {}
    for term in (card.get("coefficients") or {}).get("terms") or ():
        if isinstance(term, dict) and isinstance(term.get("mean"), int | float):
            scale = term.get("scale")
            if isinstance(scale, int | float) and scale > 0:
                ranges[str(term["feature"])] = (float(term["mean"]), float(scale))
    return ranges


def _range_strip(name: str, value: float | None, mean: float, sd: float) -> dict[str, Any]:
    """A case value against the training mean ± 2 SD, as positions (%) on a mean ± 4 SD axis."""
    lo, hi = mean - 4 * sd, mean + 4 * sd

    def pos(x: float) -> float:
        return max(0.0, min(100.0, (x - lo) / (hi - lo) * 100))

    inside = value is not None and abs(value - mean) <= 2 * sd
    return {
        "label": label(name),
        "value": fmt(name, value),
        "range": f"{fmt(name, mean - 2 * sd)} – {fmt(name, mean + 2 * sd)}",
        "band_x": pos(mean - 2 * sd),
        "band_w": pos(mean + 2 * sd) - pos(mean - 2 * sd),
        "mean_x": pos(mean),
        "value_x": pos(value) if value is not None else None,
        "inside": inside,
    }


def _contributions(prediction: Prediction | None) -> list[dict[str, Any]]:
    if prediction is None:
        return []
    items = list(prediction.contributions)
    biggest = max((abs(c.log_odds) for c in items), default=0.0) or 1.0
    return [
        {
            "label": label(c.feature),
            "value": fmt(c.feature, c.value),
            "log_odds": c.log_odds,
            "width": abs(c.log_odds) / biggest * 100,
            "positive": c.log_odds >= 0,
        }
        for c in sorted(items, key=lambda c: -abs(c.log_odds))
    ]


def descriptor_fields(
    lesion: str, form: MultiDict[str, str] | dict[str, str]
) -> list[dict[str, Any]]:
    """The descriptor inputs with what they apply to; ``hidden`` for another lesion type.

    A field of the other lesion type stays visible while it holds a value (so an error about it
    can be read and the value cleared): nothing entered is ever silently dropped.
    """
    fields = []
    for spec in feature_schema.DESCRIPTORS:
        if spec.name == feature_schema.LESION_TYPE:
            continue
        applies_to = [t.value for t in spec.applies_to]
        every = tuple(spec.applies_to) == tuple(feature_schema.ALL_LESION_TYPES)
        note = (
            ""
            if every
            else "only for " + " / ".join("NME" if t == "nme" else t for t in applies_to)
        )
        if spec.optional:
            note = (note + ", optional").lstrip(", ")
        fields.append(
            {
                "name": spec.name,
                "label": spec.label,
                "options": list(zip(spec.values, spec.value_labels, strict=True)),
                "applies": note,
                "applies_to": " ".join(applies_to),
                "hidden": bool(lesion) and lesion not in applies_to and not form.get(spec.name),
            }
        )
    return fields


def _lesion_options() -> list[tuple[str, str]]:
    spec = feature_schema.FEATURES[feature_schema.LESION_TYPE]
    return list(zip(spec.values, spec.value_labels, strict=True))


def _pacs_exports(result_id: str) -> tuple[list[ExportStatus], list[ExportStatus]]:
    """Each destination's reported state, and the dead-lettered ones (shown as an alert)."""
    exports = state().store.pacs.exports_for(result_id)
    return exports, [e for e in exports if e.state is ExportState.DEAD]


def _viewer_url(study_uid: str) -> str | None:
    template = state().settings.review_viewer_url_template
    return template.replace("{study_uid}", study_uid) if template else None


def _render_case(
    case: CaseSnapshot,
    *,
    form: MultiDict[str, str] | dict[str, str],
    errors: list[str],
    saved: bool,
    status: int,
    board_errors: list[str] | None = None,
    change: tuple[float | None, float | None] | None = None,
) -> tuple[str, int]:
    st = state()
    prediction = prediction_of(case)
    provenance = case.provenance
    qc = provenance.qc if provenance else None
    features = [
        {"label": label(n), "value": fmt(n, case.features[n])}
        for n in feature_schema.QUANTITATIVE_NAMES
        if n in case.features
    ]
    ranges = _reference_ranges(prediction)
    strips = [
        _range_strip(n, case.features.get(n), mean, sd)
        for n, (mean, sd) in ranges.items()
        if n in feature_schema.QUANTITATIVE_NAMES
    ]
    pathology = st.store.pathology_for(case.result.id)
    lesion = str(form.get(feature_schema.LESION_TYPE) or "")
    exports, dead_exports = _pacs_exports(case.result.id)
    html = render_template(
        "review_case.html",
        case=case,
        state=CaseState(case.result.state or CaseState.NEW.value),
        patient_name=_display_name(case.result.patient_name),
        reference=prediction.reference if prediction else True,
        side=display.side(case.result.laterality, "not recorded"),
        roi=provenance.roi if provenance else None,
        scanner=provenance.scanner if provenance else None,
        node_ae=f"{state().settings.node_ae_title} (DICOM port {state().settings.node_port})",
        qc_flags=qc.flags.raised() if qc else {},
        qc_words=QC_WORDS,
        qc_problems=list(qc.problems) if qc else [],
        qc_failures=PredictionBasis.stored(case.prediction.basis).qc_failures
        if case.prediction
        else (),
        ood_warnings=PredictionBasis.stored(case.prediction.basis).ood_warnings
        if case.prediction
        else (),
        evidence=_evidence(case, request.args.get("slice")),
        prediction=prediction,
        variant_text=display.VARIANT_TEXT[prediction.variant] if prediction else "",
        used=", ".join(label(n) for n in prediction.inputs_used) if prediction else "",
        missing=", ".join(label(n) for n in prediction.inputs_missing) if prediction else "",
        contributions=_contributions(prediction),
        features=features,
        strips=strips,
        pathology=pathology[0] if pathology else None,
        pathology_text=Her2Pathology(pathology[0].her2).display if pathology else "",
        viewer_url=_viewer_url(case.result.study_instance_uid),
        exports=exports,
        dead_exports=dead_exports,
        export_words=EXPORT_WORDS,
        lesion=lesion,
        lesion_options=_lesion_options(),
        descriptor_fields=descriptor_fields(lesion, form),
        decisions=[(d.value, text) for d, text in DECISIONS],
        reasons=[(r.value, r.display) for r in BoardReason],
        board_errors=board_errors,
        form=form,
        errors=errors,
        saved=saved,
        change=change,
        feedback=st.store.feedback_for(case.result.id),
        audit=st.store.audit_for(case.result.id),
    )
    return html, status


def _display_name(name: str | None) -> str:
    from cds_service.review.worklist import display_name

    return display_name(name)


def _current_form(case: CaseSnapshot) -> dict[str, str]:
    form: dict[str, str] = dict(case.descriptors.values) if case.descriptors else {}
    if case.descriptors and case.descriptors.roi_confirmed:
        form["roi_confirmed"] = "yes"
    return form


def _probability(case: CaseSnapshot | None) -> float | None:
    return case.prediction.probability if case and case.prediction else None


def _back(result_id: str, anchor: str, **args: Any) -> WerkzeugResponse:
    return redirect(url_for("review.case", result_id=result_id, **args) + anchor, code=303)


# --- views ------------------------------------------------------------------------------------


@bp.get("/cases/<result_id>")
@login_required
def case(result_id: str) -> tuple[str, int]:
    snapshot = load_case(result_id)
    state().store.mark_viewed(result_id, signed_in_user().username)
    change = None
    stored = session.pop(_CHANGE_KEY, None)
    if isinstance(stored, list) and len(stored) == 3 and stored[0] == result_id:
        change = (stored[1], stored[2])
    return _render_case(
        snapshot,
        form=_current_form(snapshot),
        errors=[],
        saved=request.args.get("saved") == "1",
        status=200,
        change=change,
    )


@bp.post("/cases/<result_id>/descriptors")
@permission_required(Permission.ENTER_DESCRIPTORS)
def save_descriptors(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """Save a descriptors version and recompute the estimate at once (old → new shown)."""
    snapshot = load_case(result_id)
    form = request.form
    errors: list[str] = []
    entered_by = signed_in_user().username
    raw = {spec.name: form.get(spec.name) or None for spec in feature_schema.DESCRIPTORS}
    values: dict[str, str] = {}
    try:
        values = validate_descriptor_values(raw)
    except feature_schema.FeatureValidationError as exc:
        errors.append(f"{label(exc.feature)}: {exc.message}")
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
    before = _probability(snapshot)
    roi_confirmed = bool(snapshot.descriptors and snapshot.descriptors.roi_confirmed)
    try:
        st.store.add_descriptors(result_id, values, roi_confirmed, entered_by)
    except NotFoundError:
        abort(404, f"no case {result_id}")
    st.predictions.recompute(result_id)
    session[_CHANGE_KEY] = [result_id, before, _probability(st.store.case(result_id))]
    return _back(result_id, "#likelihood", saved=1)


@bp.post("/cases/<result_id>/roi")
@permission_required(Permission.ENTER_DESCRIPTORS)
def confirm_roi(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """The radiologist confirms the tumour ROI: a separate, audited act (``roi-confirmed``)."""
    snapshot = load_case(result_id)
    if request.form.get("roi_confirmed") != "yes":
        errors = ["Tumour ROI: tick “I have checked the outline on every ROI slice” to confirm."]
        return _render_case(
            snapshot, form=_current_form(snapshot), errors=errors, saved=False, status=422
        )
    st = state()
    st.store.confirm_roi(result_id, signed_in_user().username)
    st.predictions.recompute(result_id)
    return _back(result_id, "#roi")


@bp.post("/cases/<result_id>/board-date")
@permission_required(Permission.SET_BOARD_DATE)
def set_board_date(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """Put the case on a tumour-board date (empty: take it off)."""
    snapshot = load_case(result_id)
    raw = (request.form.get("board_date") or "").strip()
    when: date | None = None
    if raw:
        try:
            when = date.fromisoformat(raw)
        except ValueError:
            errors = [f"Board date: “{raw[:20]}” is not a date (YYYY-MM-DD)."]
            return _render_case(
                snapshot, form=_current_form(snapshot), errors=[], saved=False, status=422,
                board_errors=errors,
            )  # fmt: skip
    state().store.set_board_date(result_id, when, signed_in_user().username)
    return _back(result_id, "#board-date")


@bp.post("/cases/<result_id>/decision")
@permission_required(Permission.RECORD_DECISION)
def board_decision(result_id: str) -> WerkzeugResponse | tuple[str, int]:
    """Tumour-board accept/override with a coded reason; the Observation status follows."""
    snapshot = load_case(result_id)
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
        return _render_case(
            snapshot,
            form=_current_form(snapshot),
            errors=[],
            saved=False,
            status=422,
            board_errors=errors,
        )
    st = state()
    st.store.board_decision(result_id, decision, reason.value, comment, reviewer)
    st.predictions.recompute(result_id)
    return _back(result_id, "#decision")
