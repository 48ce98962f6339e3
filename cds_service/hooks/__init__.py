"""CDS Hooks 2.0.1 endpoints: discovery, the ``her2low-mri`` service and its feedback."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from cds_service.errors import ApiError, IssueType
from cds_service.hooks import patient_view
from cds_service.hooks.auth import deferred_call, jwt_required, jwt_required_deferred
from cds_service.prefetch import PREFETCH_TEMPLATES
from cds_service.request_json import read_json
from cds_service.schema import HookId, parse_feedback, parse_hook_request
from cds_service.state import state
from cds_service.store import UnknownCardError

bp = Blueprint("hooks", __name__)

SERVICE_ID = patient_view.SERVICE_ID


def discovery_document() -> dict[str, Any]:
    """The CDS Services discovery response (CDS Hooks 2.0.1 §Discovery)."""
    return {
        "services": [
            {
                "id": SERVICE_ID,
                "hook": HookId.PATIENT_VIEW.value,
                "title": "HER2-low likelihood from breast MRI",
                "description": (
                    "Statistical estimate of HER2-low (vs HER2 0) status of a breast cancer "
                    "from DKI histogram features and BI-RADS MRI descriptors, with its basis; "
                    "warns when a biopsy reads HER2 0 while MRI suggests HER2-low. Not a "
                    "pathology result: confirm HER2 status by IHC/ISH."
                ),
                "prefetch": {key.value: template for key, template in PREFETCH_TEMPLATES.items()},
                "usageRequirements": (
                    "Patients are matched by identifier only "
                    "(configured DICOM issuer → Identifier.system). "
                    "Grant read access to Patient, Observation and ImagingStudy."
                ),
            }
        ]
    }


def _known(service_id: str) -> None:
    if service_id != SERVICE_ID:
        raise ApiError(404, f"no CDS service {service_id!r}; see GET /cds-services")


@bp.get("/cds-services")
@jwt_required
def discovery() -> Response:
    return jsonify(discovery_document())


@bp.post("/cds-services/<service_id>")
@jwt_required_deferred
def call(service_id: str) -> Response:
    _known(service_id)
    request_model = parse_hook_request(read_json(request))
    call = deferred_call()
    answer = patient_view.handle(call.st, request_model, call.commit, call.lookup_rows)
    if isinstance(answer, bytes):  # a prepared card, already serialized
        return Response(answer, mimetype="application/json")
    return jsonify(answer)


@bp.post("/cds-services/<service_id>/feedback")
@jwt_required
def feedback(service_id: str) -> Response:
    """Store feedback on issued cards; a batch naming any other card is refused whole (422)."""
    _known(service_id)
    parsed = parse_feedback(read_json(request))
    token = g.get("cds_token")
    actor = f"{token.iss}" if token is not None else "unauthenticated-dev"
    try:
        new, repeats = state().store.record_feedback(parsed.feedback, actor)
    except UnknownCardError as exc:
        where = f"feedback.{exc.index}.card"
        raise ApiError(
            422,
            f"{where}: this service issued no card with that uuid; nothing was stored",
            code=IssueType.NOT_FOUND,
            expression=where,
        ) from None
    return jsonify({"stored": new, "repeats": repeats})
