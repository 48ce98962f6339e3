"""Persistence operations of the service (one place that writes the database).

Every write is one short transaction; uniqueness constraints (not read-then-write) decide
idempotence under concurrent workers. Nothing here knows about HTTP or FHIR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, Table, and_, delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cds_service.orm import (
    AuditEvent,
    DescriptorEntry,
    Feedback,
    PredictionRow,
    Result,
    ResultRevision,
    UsedJti,
    utcnow,
)
from cds_service.schema import FeedbackItem, ResultPayload

log = logging.getLogger(__name__)

RESULTS: Table = Result.__table__  # type: ignore[assignment]
PREDICTIONS: Table = PredictionRow.__table__  # type: ignore[assignment]
AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]
JTI: Table = UsedJti.__table__  # type: ignore[assignment]


class IngestStatus(StrEnum):
    """Results API answers (docs/results-api.md)."""

    CREATED = "created"
    UNCHANGED = "unchanged"
    UPDATED = "updated"


class ObservationStatus(StrEnum):
    """FHIR R4 ObservationStatus values this service moves through."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    AMENDED = "amended"
    ENTERED_IN_ERROR = "entered-in-error"


class BoardDecision(StrEnum):
    """A tumour-board decision on a case's estimate (FHIR status it leads to, see below)."""

    CONFIRM = "confirm"
    AMEND = "amend"
    ENTERED_IN_ERROR = "entered-in-error"

    @property
    def observation_status(self) -> ObservationStatus | None:
        """None: the automatic status (preliminary/final) stands."""
        return {
            BoardDecision.CONFIRM: None,
            BoardDecision.AMEND: ObservationStatus.AMENDED,
            BoardDecision.ENTERED_IN_ERROR: ObservationStatus.ENTERED_IN_ERROR,
        }[self]


class ReviewFlag(StrEnum):
    """Why a case is held for review instead of being shown."""

    IDENTITY_AMBIGUOUS = "identity-ambiguous"


class NotFoundError(LookupError):
    """No such case."""


def canonical_hash(data: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces): equal content, equal hash."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None so JSON columns stay valid JSON (PostgreSQL refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class HookRow:
    """What a hook call needs of one result: identity keys and its latest prediction."""

    result_id: str
    patient_issuer: str
    patient_id: str
    review_flag: str | None
    acquired_at: datetime
    laterality: str | None
    prediction_id: int | None
    prediction: dict[str, Any] | None
    observation: dict[str, Any] | None
    observation_status: str | None
    card_uuid: str | None
    computed_at: datetime | None
    basis: dict[str, Any] | None


@dataclass(frozen=True)
class CaseSnapshot:
    """Everything known about one case, read in one transaction."""

    result: Result
    revision: ResultRevision
    descriptors: DescriptorEntry | None
    prediction: PredictionRow | None


class Store:
    """Database operations on a session factory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        self.engine: Engine = engine

    # --- results -----------------------------------------------------------------------
    def ingest_result(self, payload: ResultPayload) -> tuple[str, IngestStatus]:
        """Store a published result; idempotent per (series, pipeline_version)."""
        body = payload.model_dump(mode="json")
        digest = canonical_hash(body)
        for attempt in range(2):
            try:
                return self._ingest(payload, body, digest)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _ingest(
        self, payload: ResultPayload, body: dict[str, Any], digest: str
    ) -> tuple[str, IngestStatus]:
        now = utcnow()
        with self.sessions.begin() as s:
            existing = s.scalar(
                select(Result).where(
                    Result.series_instance_uid == payload.series_instance_uid,
                    Result.pipeline_version == payload.pipeline_version,
                )
            )
            if existing is not None:
                current = s.scalar(
                    select(ResultRevision).where(
                        ResultRevision.result_id == existing.id,
                        ResultRevision.revision == existing.revision,
                    )
                )
                if current is not None and current.payload_sha256 == digest:
                    return existing.id, IngestStatus.UNCHANGED
                result = existing
                result.revision += 1
                status = IngestStatus.UPDATED
            else:
                result = Result(
                    id=str(uuid.uuid4()),
                    series_instance_uid=payload.series_instance_uid,
                    pipeline_version=payload.pipeline_version,
                    revision=1,
                    created_at=now,
                )
                s.add(result)
                status = IngestStatus.CREATED
            result.study_instance_uid = payload.study_instance_uid
            result.patient_issuer = payload.patient.issuer
            result.patient_id = payload.patient.id
            result.accession_number = payload.accession_number or None
            result.acquired_at = payload.acquired_at
            result.laterality = payload.laterality
            result.updated_at = now
            s.flush()
            s.add(
                ResultRevision(
                    result_id=result.id,
                    revision=result.revision,
                    study_instance_uid=payload.study_instance_uid,
                    accession_number=payload.accession_number or None,
                    acquired_at=payload.acquired_at,
                    laterality=payload.laterality,
                    features=json_safe(body["features"]),
                    provenance=json_safe(body["provenance"]),
                    previews=body.get("previews") or None,
                    payload_sha256=digest,
                    received_at=now,
                )
            )
            s.add(
                AuditEvent(
                    at=now,
                    actor="dicom-node",
                    action=f"result-{status.value}",
                    result_id=result.id,
                    detail={"revision": result.revision, "series": payload.series_instance_uid},
                )
            )
            return result.id, status

    def results_for_study(self, study_instance_uid: str | None) -> list[CaseSnapshot]:
        with self.sessions() as s:
            query = select(Result.id).order_by(Result.acquired_at.desc(), Result.id)
            if study_instance_uid:
                query = query.where(Result.study_instance_uid == study_instance_uid)
            ids = list(s.scalars(query.limit(500)))
        return [snap for rid in ids if (snap := self.case(rid)) is not None]

    def case(self, result_id: str) -> CaseSnapshot | None:
        with self.sessions() as s:
            result = s.get(Result, result_id)
            if result is None:
                return None
            revision = s.scalar(
                select(ResultRevision).where(
                    ResultRevision.result_id == result_id,
                    ResultRevision.revision == result.revision,
                )
            )
            assert revision is not None
            return CaseSnapshot(
                result=result,
                revision=revision,
                descriptors=self._latest_descriptors(s, result_id),
                prediction=self._latest_prediction(s, result_id),
            )

    @staticmethod
    def _latest_descriptors(s: Session, result_id: str) -> DescriptorEntry | None:
        return s.scalar(
            select(DescriptorEntry)
            .where(DescriptorEntry.result_id == result_id)
            .order_by(DescriptorEntry.version.desc())
            .limit(1)
        )

    @staticmethod
    def _latest_prediction(s: Session, result_id: str) -> PredictionRow | None:
        return s.scalar(
            select(PredictionRow)
            .where(PredictionRow.result_id == result_id)
            .order_by(PredictionRow.id.desc())
            .limit(1)
        )

    def worklist(self, limit: int = 200) -> list[CaseSnapshot]:
        return self.results_for_study(None)[:limit]

    def results_for_patient(
        self, keys: Iterable[tuple[str, str]]
    ) -> list[tuple[Result, PredictionRow | None]]:
        """Results whose (issuer, PatientID) is one of ``keys``, newest acquisition first."""
        pairs = list(keys)
        if not pairs:
            return []
        with self.sessions() as s:
            rows = list(
                s.scalars(
                    select(Result)
                    .where(
                        or_(
                            *(
                                and_(Result.patient_issuer == issuer, Result.patient_id == pid)
                                for issuer, pid in pairs
                            )
                        )
                    )
                    .order_by(Result.acquired_at.desc(), Result.updated_at.desc())
                    .limit(50)
                )
            )
            return [(r, self._latest_prediction(s, r.id)) for r in rows]

    def hook_rows(self, keys: Iterable[tuple[str, str]]) -> list[HookRow]:
        """Results of (issuer, PatientID) keys with their latest prediction, in one query.

        Core, not ORM: this is the hot path of every patient-view call.
        """
        pairs = list(keys)
        if not pairs:
            return []
        r, p = RESULTS, PREDICTIONS
        latest = (
            select(func.max(p.c.id)).where(p.c.result_id == r.c.id).correlate(r).scalar_subquery()
        )
        query = (
            select(
                r.c.id,
                r.c.patient_issuer,
                r.c.patient_id,
                r.c.review_flag,
                r.c.acquired_at,
                r.c.laterality,
                p.c.id,
                p.c.prediction,
                p.c.observation,
                p.c.observation_status,
                p.c.card_uuid,
                p.c.computed_at,
                p.c.basis,
            )
            .select_from(r.outerjoin(p, p.c.id == latest))
            .where(or_(*(and_(r.c.patient_issuer == i, r.c.patient_id == v) for i, v in pairs)))
            .order_by(r.c.acquired_at.desc(), r.c.updated_at.desc())
            .limit(50)
        )
        with self.engine.connect() as conn:
            return [HookRow(*row) for row in conn.execute(query)]  # type: ignore[call-arg]

    def flag(
        self, result_ids: Sequence[str], flag: ReviewFlag, actor: str, detail: dict[str, Any]
    ) -> None:
        with self.sessions.begin() as s:
            for rid in result_ids:
                result = s.get(Result, rid)
                if result is None:
                    continue
                result.review_flag = flag.value
                s.add(AuditEvent(actor=actor, action=flag.value, result_id=rid, detail=detail))

    # --- descriptors and predictions ------------------------------------------------------
    def add_descriptors(
        self, result_id: str, values: dict[str, str], roi_confirmed: bool, entered_by: str
    ) -> int:
        """Append a descriptors version; returns its number."""
        for attempt in range(3):
            try:
                with self.sessions.begin() as s:
                    if s.get(Result, result_id) is None:
                        raise NotFoundError(result_id)
                    latest = s.scalar(
                        select(func.max(DescriptorEntry.version)).where(
                            DescriptorEntry.result_id == result_id
                        )
                    )
                    version = (latest or 0) + 1
                    s.add(
                        DescriptorEntry(
                            result_id=result_id,
                            version=version,
                            entered_by=entered_by,
                            values=values,
                            roi_confirmed=roi_confirmed,
                        )
                    )
                    s.add(
                        AuditEvent(
                            actor=entered_by,
                            action="descriptors-entered",
                            result_id=result_id,
                            detail={"version": version, "roi_confirmed": roi_confirmed},
                        )
                    )
                    return version
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def board_decision(
        self, result_id: str, decision: BoardDecision, reason: str, comment: str, reviewer: str
    ) -> None:
        """Record a tumour-board decision (audited); AMEND / ENTERED_IN_ERROR override the
        Observation status of this and later predictions of the case."""
        with self.sessions.begin() as s:
            result = s.get(Result, result_id)
            if result is None:
                raise NotFoundError(result_id)
            status = decision.observation_status
            result.observation_override = status.value if status else None
            s.add(
                AuditEvent(
                    actor=reviewer,
                    action=f"board-{decision.value}",
                    result_id=result_id,
                    detail={"reason": reason, "comment": comment}
                    if comment
                    else {"reason": reason},
                )
            )

    def save_prediction(self, row: PredictionRow) -> PredictionRow:
        with self.sessions.begin() as s:
            s.add(row)
        return row

    def prediction_by_card(self, card_uuid: str) -> PredictionRow | None:
        with self.sessions() as s:
            return s.scalar(select(PredictionRow).where(PredictionRow.card_uuid == card_uuid))

    # --- feedback, audit, replay --------------------------------------------------------
    def record_feedback(self, items: Sequence[FeedbackItem], actor: str) -> tuple[int, int]:
        """Store feedback; repeats (same card, outcome, timestamp) are ignored. → (new, repeats)."""
        for attempt in range(2):
            try:
                return self._record_feedback(items, actor)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _record_feedback(self, items: Sequence[FeedbackItem], actor: str) -> tuple[int, int]:
        new = repeats = 0
        with self.sessions.begin() as s:
            for item in items:
                when = item.outcome_timestamp.astimezone(UTC)
                seen = s.scalar(
                    select(Feedback.id).where(
                        Feedback.card_uuid == item.card,
                        Feedback.outcome == item.outcome.value,
                        Feedback.outcome_timestamp == when,
                    )
                )
                if seen is not None:
                    repeats += 1
                    continue
                result_id = s.scalar(
                    select(PredictionRow.result_id).where(PredictionRow.card_uuid == item.card)
                )
                reason = item.override_reason
                s.add(
                    Feedback(
                        card_uuid=item.card,
                        result_id=result_id,
                        outcome=item.outcome.value,
                        accepted_suggestions=[a.id for a in item.accepted_suggestions or []]
                        or None,
                        override_reason=(
                            reason.reason.model_dump(exclude_none=True)
                            if reason and reason.reason
                            else None
                        ),
                        user_comment=reason.user_comment if reason else None,
                        outcome_timestamp=when,
                    )
                )
                s.add(
                    AuditEvent(
                        actor=actor,
                        action=f"feedback-{item.outcome.value}",
                        result_id=result_id,
                        detail={"card": item.card},
                    )
                )
                s.flush()
                new += 1
        return new, repeats

    def feedback_for(self, result_id: str) -> list[Feedback]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Feedback)
                    .where(Feedback.result_id == result_id)
                    .order_by(Feedback.outcome_timestamp.desc())
                )
            )

    def audit(
        self, actor: str, action: str, result_id: str | None, detail: dict[str, Any] | None = None
    ) -> None:
        self.audit_many([(actor, action, result_id, detail)])

    def audit_many(
        self, events: Sequence[tuple[str, str, str | None, dict[str, Any] | None]]
    ) -> None:
        """Append audit events in one transaction (Core insert: also on the hook's hot path)."""
        if not events:
            return
        now = utcnow()
        rows = [
            {"at": now, "actor": a, "action": act, "result_id": rid, "detail": d}
            for a, act, rid, d in events
        ]
        with self.engine.begin() as conn:
            conn.execute(insert(AUDIT), rows)

    def discordant_results(self) -> set[str]:
        """Cases for which a hook call saw biopsy HER2 0 with an estimate at/above threshold."""
        with self.sessions() as s:
            return set(
                s.scalars(
                    select(AuditEvent.result_id)
                    .where(AuditEvent.action == "discordance-detected")
                    .distinct()
                )
            )

    def audit_for(self, result_id: str, limit: int = 50) -> list[AuditEvent]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.result_id == result_id)
                    .order_by(AuditEvent.id.desc())
                    .limit(limit)
                )
            )

    def use_jti(self, iss: str, jti: str, exp: int, leeway: int) -> bool:
        """Record a token id; False if it was seen before (replay). Purges expired ids."""
        expires = datetime.fromtimestamp(exp, UTC) + timedelta(seconds=leeway)
        table = JTI
        engine = self.engine
        try:
            with engine.begin() as conn:
                conn.execute(insert(table).values(iss=iss, jti=jti, exp=expires))
        except IntegrityError:
            return False
        if uuid.uuid4().int % 256 == 0:  # amortised purge, no scheduler needed
            with engine.begin() as conn:
                conn.execute(delete(table).where(table.c.exp < utcnow()))
        return True
