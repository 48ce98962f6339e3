"""The ``her2low-mri`` service on ``patient-view``: match the patient, read the stored prediction.

Nothing is computed here beyond the card: CDS Hooks 2.0.1 wants answers well under 500 ms, so
predictions, their Observations and the card's basis are prepared when inputs change, and this
path runs one read query and one audit insert.
"""

from __future__ import annotations

import logging
from typing import Any

from cds_service.biopsy import BiopsyHer2, BiopsyReading, latest_reading
from cds_service.cards import CardContext, descriptors_needed_card, prediction_card
from cds_service.errors import ApiError
from cds_service.identity import AmbiguousIdentityError, patient_keys
from cds_service.prefetch import PrefetchKey, PrefetchResolver, bundle_resources
from cds_service.schema import HookRequest
from cds_service.state import ServiceState
from cds_service.store import HookRow, ReviewFlag
from models.prediction import Prediction

log = logging.getLogger(__name__)

SERVICE_ID = "her2low-mri"
NO_CARDS: dict[str, Any] = {"cards": []}


def _hold(st: ServiceState, result_ids: list[str], actor: str, why: str) -> dict[str, Any]:
    st.store.flag(result_ids, ReviewFlag.IDENTITY_AMBIGUOUS, actor, {"why": why})
    log.warning("patient identity ambiguous; case held", extra={"cases": len(result_ids)})
    return {"cards": []}


def _patient(resolver: PrefetchResolver, request: HookRequest) -> dict[str, Any] | None:
    """The context Patient (one resource), None if the EHR has none."""
    patients = bundle_resources(resolver.get(PrefetchKey.PATIENT), "Patient")
    if len(patients) != 1:
        return None
    patient = patients[0]
    if patient.get("id") not in (None, request.context.patient_id):
        raise ApiError(
            400,
            "prefetch.patient is not the patient in context.patientId",
            expression="prefetch.patient",
        )
    return patient


def _all_keys(st: ServiceState, patient: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (issuer, value) pair of a Patient, ignoring ambiguity (to find cases to hold)."""
    keys = []
    for ident in patient.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            keys += [
                (issuer, ident["value"])
                for issuer, system in st.settings.cds_patient_id_systems.items()
                if system == ident.get("system")
            ]
    return keys


def handle(st: ServiceState, request: HookRequest) -> dict[str, Any]:
    """Answer one patient-view call: ``{"cards": [...]}``."""
    resolver = PrefetchResolver(
        request, st.settings.cds_fhir_timeout_seconds, st.settings.cds_fhir_server_allowlist
    )
    actor = request.context.user_id
    patient = _patient(resolver, request)
    if patient is None:
        return {"cards": []}
    try:
        keys = patient_keys(patient, st.settings.cds_patient_id_systems).keys
    except AmbiguousIdentityError as exc:
        found = st.store.hook_rows(_all_keys(st, patient))
        return _hold(st, [r.result_id for r in found], actor, str(exc)) if found else NO_CARDS
    rows = st.store.hook_rows(keys)
    if not rows:
        return {"cards": []}
    if len({(r.patient_issuer, r.patient_id) for r in rows}) > 1:
        return _hold(st, [r.result_id for r in rows], actor, "results under several DICOM patients")
    if any(r.review_flag == ReviewFlag.IDENTITY_AMBIGUOUS.value for r in rows):
        return {"cards": []}
    row = rows[0]
    if row.prediction_id is None or row.observation_status == "entered-in-error":
        return {"cards": []}  # nothing yet, or the tumour board withdrew the estimate
    prediction = Prediction.from_dict(row.prediction) if row.prediction else None
    biopsy = BiopsyReading(BiopsyHer2.UNKNOWN)
    if prediction is not None:
        biopsy = latest_reading(resolver.get(PrefetchKey.HER2))
    card = _card(st, request, row, prediction, biopsy)
    if card is None:
        return {"cards": []}
    detail = {"card": row.card_uuid, "hookInstance": request.hook_instance}
    events: list[tuple[str, str, str | None, dict[str, Any] | None]] = [
        (actor, "card-shown", row.result_id, detail)
    ]
    if card.get("indicator") == "warning":
        events.append((actor, "discordance-detected", row.result_id, detail))
    st.store.audit_many(events)
    return {"cards": [card]}


def _card(
    st: ServiceState,
    request: HookRequest,
    row: HookRow,
    prediction: Prediction | None,
    biopsy: BiopsyReading,
) -> dict[str, Any] | None:
    assert row.card_uuid is not None and row.computed_at is not None
    basis = row.basis or {}
    case_url = f"{st.base_url}/review/cases/{row.result_id}"
    ctx = CardContext(
        result_id=row.result_id,
        card_uuid=row.card_uuid,
        acquired_at=row.acquired_at,
        computed_at=row.computed_at,
        laterality=row.laterality,
        provenance={"roi": basis.get("roi"), "qc": basis.get("qc")},
        observation=row.observation,
        observation_status=row.observation_status or "preliminary",
        case_url=case_url,
        descriptors_url=f"{case_url}#descriptors",
        model_card_url=f"{st.base_url}/review/model-card",
        descriptors_entered=bool(basis.get("descriptors_entered")),
        biopsy=biopsy,
    )
    if prediction is not None:
        return prediction_card(prediction, ctx, request.context.patient_id)
    if not ctx.descriptors_entered:
        return descriptors_needed_card(ctx)
    log.warning("no prediction for case with descriptors", extra={"result_id": row.result_id})
    return None
