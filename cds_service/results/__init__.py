"""Results API v1 (docs/results-api.md): the node publishes results; descriptors enter here too.

Authenticated by the shared results token, compared in constant time. Every accepted input
triggers a recomputation of the prediction, so hook calls only read. Results in the PACS go both
ways here too: the node reports its export states (``PUT /exports``) and polls the service's
assessments (``GET /assessments``) to write them into its revised Measurement Report.
"""

from __future__ import annotations

import hmac
import math
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cds_service.auth import bearer_token
from cds_service.cards import PredictionBasis
from cds_service.errors import ApiError, IssueType
from cds_service.fhir import NOTE_REFERENCE
from cds_service.orm import utcnow
from cds_service.request_json import parse_timestamp, read_json
from cds_service.schema import parse_descriptors, parse_export_report, parse_result
from cds_service.state import state
from cds_service.store import AssessmentRow, CaseSnapshot, IngestStatus, NotFoundError
from cds_service.store.exports import DEFAULT_ASSESSMENTS, MAX_ASSESSMENTS
from models.contract import Assessment, AssessmentPage
from models.prediction import Prediction

bp = Blueprint("results", __name__, url_prefix="/api/v1")


@bp.before_request
def _require_token() -> None:
    """Shared-secret bearer check (constant-time)."""
    presented = bearer_token(request.headers.get("Authorization")) or ""
    expected = state().settings.results_token()
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise ApiError(401, "", code=IssueType.LOGIN, headers={"WWW-Authenticate": "Bearer"})


def case_summary(case: CaseSnapshot) -> dict[str, Any]:
    """One result with its current prediction, as the node and operators see it."""
    row = case.prediction
    prediction: dict[str, Any] | None = None
    if row is not None:
        prediction = {
            "probability": row.probability,
            "computed_at": row.computed_at.isoformat(),
            "observation_status": row.observation_status,
            "descriptors_version": row.descriptors_version,
            "variant": (row.prediction or {}).get("variant"),
            "model_version": (row.prediction or {}).get("model_version"),
            "error": row.error,
            "not_scored": PredictionBasis.stored(row.basis).not_scored,
        }
    return {
        "result_id": case.result.id,
        "study_instance_uid": case.result.study_instance_uid,
        "series_instance_uid": case.result.series_instance_uid,
        "pipeline_version": case.result.pipeline_version,
        "revision": case.result.revision,
        "acquired_at": case.result.acquired_at.isoformat(),
        "laterality": case.result.laterality,
        "descriptors_entered": case.descriptors is not None,
        "review_flag": case.result.review_flag,
        "features": case.features,
        "provenance": case.provenance.model_dump(mode="json") if case.provenance else None,
        "prediction": prediction,
    }


@bp.post("/results")
def publish() -> tuple[Response, int]:
    payload = parse_result(read_json(request))
    st = state()
    result_id, status = st.store.ingest_result(payload)
    if status is not IngestStatus.UNCHANGED:
        st.predictions.recompute(result_id)
    code = 201 if status is IngestStatus.CREATED else 200
    return jsonify({"result_id": result_id, "status": status.value}), code


@bp.get("/results")
def list_results() -> Response:
    study = request.args.get("study_instance_uid") or None
    cases = state().store.results_for_study(study)
    return jsonify({"results": [case_summary(c) for c in cases]})


@bp.get("/cases/<result_id>")
def get_case(result_id: str) -> Response:
    case = state().store.case(result_id)
    if case is None:
        raise ApiError(404, f"no case {result_id}")
    return jsonify(case_summary(case))


@bp.put("/cases/<result_id>/descriptors")
def put_descriptors(result_id: str) -> tuple[Response, int]:
    values, roi_confirmed, entered_by = parse_descriptors(read_json(request))
    st = state()
    try:
        version = st.store.add_descriptors(result_id, values, roi_confirmed, entered_by)
    except NotFoundError:
        raise ApiError(404, f"no case {result_id}") from None
    st.predictions.recompute(result_id)
    case = st.store.case(result_id)
    assert case is not None
    return jsonify({"descriptors_version": version, **case_summary(case)}), 200


# --- results in the PACS ------------------------------------------------------------------------


@bp.put("/exports")
def put_exports() -> tuple[Response, int]:
    """The node's export states for one analysed series (``models.contract.ExportReport``)."""
    report = parse_export_report(read_json(request))
    recorded = state().store.pacs.record_exports(report)
    if recorded is None:
        raise ApiError(
            404,
            f"no result for series {report.series_instance_uid} "
            f"(pipeline {report.pipeline_version})",
        )
    _, states = recorded
    body = {
        "api_version": 1,
        "series_instance_uid": report.series_instance_uid,
        "pipeline_version": report.pipeline_version,
        "exports": [status.model_dump(mode="json") for status in states],
    }
    return jsonify(body), 200


def _since(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise ApiError(400, f"since: {exc}", code=IssueType.VALUE, expression="since") from None


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_ASSESSMENTS
    digits = raw.isascii() and raw.isdigit() and len(raw) <= 4
    if not digits or not 1 <= int(raw) <= MAX_ASSESSMENTS:
        raise ApiError(
            400,
            f"limit: expected an integer from 1 to {MAX_ASSESSMENTS}, got {raw[:32]!r}",
            code=IssueType.VALUE,
            expression="limit",
        )
    return int(raw)


def _stored_prediction(data: object) -> Prediction | None:
    """A prediction row's model output read back (None if absent or unreadable)."""
    if not isinstance(data, dict) or not data:
        return None
    try:
        return Prediction.from_dict(data)
    except (KeyError, TypeError, ValueError):
        return None


def _not_scored(row: AssessmentRow) -> tuple[str, ...]:
    """Why a case has no likelihood, in the words its card and case page use."""
    basis = PredictionBasis.stored(row.basis)
    if basis.qc_failures:
        return tuple(f.text[:500] for f in basis.qc_failures)
    reason = basis.not_scored or row.error or "not scored"
    return (reason[:500],)


def assessment(row: AssessmentRow) -> Assessment:
    """One case's current prediction as the node writes it into the PACS (typed contract)."""
    prediction = _stored_prediction(row.prediction)
    probability = row.probability
    if prediction is None or probability is None or not math.isfinite(probability):
        prediction, probability = None, None
    descriptors = {
        str(k): v for k, v in (row.descriptors or {}).items() if isinstance(v, str) and len(v) <= 64
    }
    return Assessment(
        result_id=row.result_id,
        series_instance_uid=row.series_instance_uid,
        pipeline_version=row.pipeline_version,
        revision=row.revision,
        descriptors=descriptors,
        descriptors_version=row.descriptors_version if row.descriptors is not None else None,
        probability=None if probability is None else min(max(probability, 0.0), 1.0),
        model_name=f"{prediction.model_name} ({prediction.variant.value})"[:128]
        if prediction
        else None,
        model_version=prediction.model_version[:64] if prediction else None,
        # the card's ``reference`` flag is what says a model is not clinically validated
        clinically_validated=bool(prediction and not prediction.reference),
        statement=NOTE_REFERENCE if prediction and prediction.reference else "",
        not_scored=() if prediction else _not_scored(row),
        computed_at=row.computed_at,
    )


@bp.get("/assessments")
def list_assessments() -> Response:
    """Current predictions computed after ``since`` (exclusive), oldest first; poll from ``until``."""
    since = _since(request.args.get("since"))
    limit = _limit(request.args.get("limit"))
    rows = state().store.pacs.assessments(since, limit)
    until = rows[-1].computed_at if rows else (since or utcnow())
    page = AssessmentPage(assessments=tuple(assessment(r) for r in rows), until=until)
    return jsonify(page.model_dump(mode="json"))
