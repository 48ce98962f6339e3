"""The ``her2low-mri`` service on ``patient-view``: match the patient, read the stored prediction.

Nothing is computed here beyond splicing per-call values into a prepared card: CDS Hooks 2.0.1
wants answers well under 500 ms, so predictions and their Observations are prepared when inputs
change, each worker serializes a prediction's card once (``card_cache``), and this path runs at
most one light read query (``lookup``, reused while nothing changed) and one write transaction
(jti + audit, through ``commit``), both on the call's one pooled connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cds_service.audit import AuditAction
from cds_service.biopsy import BiopsyHer2, BiopsyReading, latest_reading
from cds_service.card_cache import CardTemplate, PreparedCard, Slot
from cds_service.cards import (
    CardContext,
    PredictionBasis,
    biopsy_line,
    build_prediction_card,
    descriptors_needed_card,
    not_scored_card,
    qc_failed_card,
)
from cds_service.case_state import is_discordant
from cds_service.errors import ApiError
from cds_service.fhir_transparency import (
    DescriptorSource,
    variant_model_card,
)
from cds_service.identity import AmbiguousIdentityError, patient_keys
from cds_service.pathology import record_from_prefetch
from cds_service.predictions import RuntimeUnavailableError
from cds_service.prefetch import (
    PrefetchKey,
    PrefetchResolver,
    bundle_resources,
    fhir_list,
    imaging_study_ids,
)
from cds_service.schema import HookRequest
from cds_service.state import ServiceState
from cds_service.store import AuditTuple, HookRow, ReviewFlag
from cds_service.writeback import WritebackJob, server_allowed, writer_for
from models.prediction import Prediction

log = logging.getLogger(__name__)

SERVICE_ID = "her2low-mri"
NO_CARDS: dict[str, Any] = {"cards": []}

Commit = Callable[[Sequence[AuditTuple]], None]
Lookup = Callable[[Iterable[tuple[str, str]]], list[HookRow]]


def _hold(
    st: ServiceState, result_ids: list[str], actor: str, why: str, commit: Commit
) -> dict[str, Any]:
    commit(())  # the token's jti first: a replayed call must not change anything
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
    for ident in fhir_list(patient.get("identifier")):
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            keys += [
                (issuer, ident["value"])
                for issuer, system in st.settings.cds_patient_id_systems.items()
                if system == ident.get("system")
            ]
    return keys


def handle(
    st: ServiceState, request: HookRequest, commit: Commit, lookup: Lookup
) -> bytes | dict[str, Any]:
    """Answer one patient-view call: the serialized ``{"cards": [...]}`` body, or a dict.

    ``commit(events)`` records the call's token and audit events in one transaction (and refuses
    a replay); it is called before any card leaves and before any other write. ``lookup(keys)``:
    the call's hook lookup (``commit`` then commits on its connection, and checks it if reused).
    """
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
        found = lookup(_all_keys(st, patient))
        if not found:
            return NO_CARDS
        return _hold(st, [r.result_id for r in found], actor, str(exc), commit)
    rows = lookup(keys)
    if not rows:
        return {"cards": []}
    if len({(r.patient_issuer, r.patient_id) for r in rows}) > 1:
        why = "results under several DICOM patients"
        return _hold(st, [r.result_id for r in rows], actor, why, commit)
    if any(r.review_flag == ReviewFlag.IDENTITY_AMBIGUOUS.value for r in rows):
        return {"cards": []}
    row = rows[0]
    if row.prediction_id is None or row.observation_status == "entered-in-error":
        return {"cards": []}  # nothing yet, or the tumour board withdrew the estimate
    # Everything the prepared card shows comes from the (insert-only) prediction row and these
    # result columns, so they are the key; patient and biopsy are spliced in per call.
    key = (row.prediction_id, row.result_id, row.acquired_at, row.laterality)
    prepared = st.cards.get_or_build(key, lambda: _prepare(st, row))
    if prepared.plain is None:
        if prepared.warning:
            log.warning(prepared.warning, extra={"result_id": row.result_id})
        return {"cards": []}
    biopsy = BiopsyReading(BiopsyHer2.UNKNOWN)
    if prepared.needs_biopsy:
        biopsy = latest_reading(resolver.get(PrefetchKey.HER2))
    # prepared.discordant exists only for an estimate at/above the threshold (see _prepare)
    discordant = is_discordant(
        above_threshold=prepared.discordant is not None,
        biopsy_her2_zero=biopsy.status is BiopsyHer2.ZERO,
    )
    template = prepared.discordant if discordant and prepared.discordant else prepared.plain
    study_ids = None
    if prepared.needs_biopsy:  # a prediction card: name the EHR's ImagingStudy when it has one
        study_ids = imaging_study_ids(resolver.get(PrefetchKey.IMAGING, required=False))
    body = template.render(
        {Slot.PATIENT_ID: request.context.patient_id, Slot.BIOPSY_LINE: biopsy_line(biopsy)},
        study_ids,
    )
    detail = {"card": prepared.card_uuid, "hookInstance": request.hook_instance}
    events: list[AuditTuple] = [(actor, AuditAction.CARD_SHOWN, row.result_id, detail)]
    if discordant:
        events.append((actor, AuditAction.DISCORDANCE_DETECTED, row.result_id, detail))
    commit(events)
    if biopsy.date:  # a HER2 result dated after the MRI is kept for the concordance view
        record_from_prefetch(
            st.store, row.result_id, row.acquired_at, biopsy, actor, st.pathology_sources
        )
    if prepared.needs_biopsy and st.settings.cds_fhir_writeback:
        _write_back(st, request, body, row.result_id, prepared.card_uuid)
    return body


def _write_back(
    st: ServiceState, request: HookRequest, body: bytes, result_id: str, card_uuid: str
) -> None:
    """Queue the card's resources for the EHR's fhirServer (never blocks the response)."""
    server = request.fhir_server
    if server is None or not server_allowed(server, st.settings.cds_fhir_server_allowlist):
        return
    auth = request.fhir_authorization
    writer = writer_for(
        st,
        st.store,
        timeout=st.settings.cds_fhir_timeout_seconds,
        attempts=st.settings.cds_fhir_writeback_attempts,
    )
    writer.submit(
        WritebackJob(
            server=server,
            body=body,
            result_id=result_id,
            card_uuid=card_uuid,
            hook_instance=request.hook_instance,
            access_token=auth.access_token if auth is not None else None,
            not_after=time.monotonic() + auth.expires_in if auth is not None else None,
        )
    )


def _prepare(st: ServiceState, row: HookRow) -> PreparedCard:
    """Serialize the card(s) of one prediction row with slots for the per-call values."""
    assert row.card_uuid is not None and row.computed_at is not None
    assert row.prediction_id is not None
    parts = st.store.prediction_parts(row.prediction_id)
    if parts is None:
        return PreparedCard(row.card_uuid, None, None, needs_biopsy=False)
    prediction = Prediction.from_dict(parts.prediction) if parts.prediction else None
    basis = PredictionBasis.stored(parts.basis)
    case_url = f"{st.base_url}/review/cases/{row.result_id}"
    if basis.qc_failures:  # failed the QC gate: no estimate, a card saying why and what to do
        ctx = _failed_context(st, row, basis, case_url)
        card = qc_failed_card(ctx, basis.qc_failures)
        return PreparedCard(row.card_uuid, CardTemplate(card), None, needs_biopsy=False)
    if basis.not_scored:  # settings differ from the model's: no estimate, a card saying so
        ctx = _failed_context(st, row, basis, case_url)
        card = not_scored_card(ctx, basis.not_scored)
        return PreparedCard(
            row.card_uuid, CardTemplate(card), None, needs_biopsy=False, warning="result not scored"
        )
    ctx = CardContext(
        result_id=row.result_id,
        card_uuid=row.card_uuid,
        acquired_at=row.acquired_at,
        computed_at=row.computed_at,
        laterality=row.laterality,
        roi=basis.roi,
        qc=basis.qc,
        observation=parts.observation,
        observation_status=row.observation_status or "preliminary",
        case_url=case_url,
        descriptors_url=f"{case_url}#descriptors",
        model_card_url=f"{st.base_url}/review/model-card",
        descriptors_entered=basis.descriptors_entered,
        biopsy=BiopsyReading(BiopsyHer2.UNKNOWN),
        descriptors_source=_descriptor_source(st, row) if basis.descriptors_entered else None,
        model_card_markdown=_model_card(st, prediction) if prediction is not None else None,
        ood_warnings=basis.ood_warnings,
    )
    if prediction is not None:

        def template(discordant: bool) -> CardTemplate:
            card = build_prediction_card(
                prediction,
                ctx,
                Slot.PATIENT_ID.value,
                discordant=discordant,
                biopsy_text=Slot.BIOPSY_LINE.value,
            )
            return CardTemplate(card)

        discordant = template(True) if prediction.above_threshold else None
        return PreparedCard(row.card_uuid, template(False), discordant, needs_biopsy=True)
    if not ctx.descriptors_entered:
        return PreparedCard(
            row.card_uuid, CardTemplate(descriptors_needed_card(ctx)), None, needs_biopsy=False
        )
    return PreparedCard(
        row.card_uuid,
        None,
        None,
        needs_biopsy=False,
        warning="no prediction for case with descriptors",
    )


def _failed_context(
    st: ServiceState, row: HookRow, basis: PredictionBasis, case_url: str
) -> CardContext:
    """The card context of a result with no estimate (no Observation, no descriptors link)."""
    assert row.card_uuid is not None and row.computed_at is not None
    return CardContext(
        result_id=row.result_id,
        card_uuid=row.card_uuid,
        acquired_at=row.acquired_at,
        computed_at=row.computed_at,
        laterality=row.laterality,
        roi=basis.roi,
        qc=basis.qc,
        observation=None,
        observation_status=row.observation_status or "preliminary",
        case_url=case_url,
        descriptors_url=f"{case_url}#descriptors",
        model_card_url=f"{st.base_url}/review/model-card",
        descriptors_entered=basis.descriptors_entered,
        biopsy=BiopsyReading(BiopsyHer2.UNKNOWN),
    )


def _descriptor_source(st: ServiceState, row: HookRow) -> DescriptorSource | None:
    """Who entered the descriptors this prediction used (Provenance entity agent)."""
    case = st.store.case(row.result_id)
    if case is None or case.descriptors is None or case.prediction is None:
        return None
    if case.prediction.id != row.prediction_id:
        return None  # a newer prediction appeared meanwhile; its own card will name its author
    if case.prediction.descriptors_version != case.descriptors.version:
        return None
    entry = case.descriptors
    return DescriptorSource(entry.entered_by, entry.version, entry.entered_at)


def _model_card(st: ServiceState, prediction: Prediction) -> str | None:
    """The Markdown model card of the prediction's model variant (None: a minimal one is used)."""
    try:
        return variant_model_card(st.runtime.get(), prediction)
    except RuntimeUnavailableError:
        return None
