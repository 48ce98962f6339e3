"""Results API v1 (docs/results-api.md): the node publishes results; descriptors enter here too.

Authenticated by the shared results token, compared in constant time. Every accepted input
triggers a recomputation of the prediction, so hook calls only read.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cds_service.auth import bearer_token
from cds_service.cards import PredictionBasis
from cds_service.errors import ApiError, IssueType
from cds_service.request_json import read_json
from cds_service.schema import parse_descriptors, parse_result
from cds_service.state import state
from cds_service.store import CaseSnapshot, IngestStatus, NotFoundError

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
