"""Persistence operations of the service (one place that writes the database).

Every write is one short transaction; uniqueness constraints (not read-then-write) decide
idempotence under concurrent workers. Nothing here knows about HTTP or FHIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    Insert,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
)
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
from cds_service.schema import FeedbackItem
from models.contract import Provenance, ResultPayload, read_features

log = logging.getLogger(__name__)

RESULTS: Table = Result.__table__  # type: ignore[assignment]
PREDICTIONS: Table = PredictionRow.__table__  # type: ignore[assignment]
AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]
JTI: Table = UsedJti.__table__  # type: ignore[assignment]

_T = TypeVar("_T")


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


class UnknownCardError(NotFoundError):
    """Feedback names a card this service never issued (``index``: its place in the batch)."""

    def __init__(self, index: int, card: str) -> None:
        super().__init__(f"feedback {index}: unknown card")
        self.index = index
        self.card = card


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
    """What a hook call needs of one result: identity keys and its latest prediction's key.

    Light columns only: the prediction's JSON (prediction, Observation, basis) is read by
    ``prediction_parts`` only when a worker has not yet prepared the card of that prediction.
    """

    result_id: str
    patient_issuer: str
    patient_id: str
    review_flag: str | None
    acquired_at: datetime
    laterality: str | None
    prediction_id: int | None
    observation_status: str | None
    card_uuid: str | None
    computed_at: datetime | None


@dataclass(frozen=True)
class PredictionParts:
    """The JSON columns of one prediction row (immutable once inserted)."""

    prediction: dict[str, Any] | None
    observation: dict[str, Any] | None
    basis: dict[str, Any] | None


AuditTuple = tuple[str, str, str | None, dict[str, Any] | None]


@dataclass(frozen=True)
class UsedToken:
    """A verified token's replay key, kept until ``expires`` (exp + leeway)."""

    iss: str
    jti: str
    expires: datetime

    @classmethod
    def of(cls, iss: str, jti: str, exp: int, leeway: int) -> UsedToken:
        return cls(iss, jti, datetime.fromtimestamp(exp, UTC) + timedelta(seconds=leeway))


class WriteGate:
    """Serializes this host's writers to one SQLite file: a thread lock plus ``flock``.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (1, 2, 5,
    10 … ms, its default busy handler), which under a few concurrent hook calls turned into
    tails of 100+ ms. Queuing on a lock instead wakes the next writer as soon as the lock is
    released. The thread lock covers gunicorn threads, ``flock`` (kernel-queued, released if the
    process dies) covers the workers; the file descriptor is reopened after a fork because
    ``flock`` belongs to the open file description. Other databases: no gate.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def for_engine(cls, engine: Engine) -> WriteGate:
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        return cls(f"{database}.write-lock")

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            assert self.path is not None
            if self._fd is not None:
                os.close(self._fd)  # the parent's description; the parent keeps its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


def _retry_on_conflict(write: Callable[[], _T], *, attempts: int) -> _T:
    """Run a write transaction again when a concurrent writer took its unique key first.

    Two service instances (or threads) may insert the same natural key at once; the loser's
    transaction fails with an IntegrityError and, re-run, sees the winner's row.
    """
    for attempt in range(attempts):
        try:
            return write()
        except IntegrityError:
            if attempt == attempts - 1:
                raise
    raise ValueError("attempts must be at least 1")


class _Replayed(Exception):
    """Internal: the jti insert hit the unique key; rolls back the whole call transaction."""


@functools.lru_cache(maxsize=16)
def _hook_query(pairs: int) -> Select[Any]:
    """The hook lookup for ``pairs`` (issuer, PatientID) keys, built once per key count.

    Bind parameters ``i0, v0, i1, v1 …``: the statement object is reused, so each call skips
    building the expression tree (SQLAlchemy still hits its compiled cache).
    """
    r, p = RESULTS, PREDICTIONS
    latest = select(func.max(p.c.id)).where(p.c.result_id == r.c.id).correlate(r).scalar_subquery()
    keys = or_(
        *(
            and_(r.c.patient_issuer == bindparam(f"i{k}"), r.c.patient_id == bindparam(f"v{k}"))
            for k in range(pairs)
        )
    )
    return (
        select(
            r.c.id,
            r.c.patient_issuer,
            r.c.patient_id,
            r.c.review_flag,
            r.c.acquired_at,
            r.c.laterality,
            p.c.id,
            p.c.observation_status,
            p.c.card_uuid,
            p.c.computed_at,
        )
        .select_from(r.outerjoin(p, p.c.id == latest))
        .where(keys)
        .order_by(r.c.acquired_at.desc(), r.c.updated_at.desc())
        .limit(50)
    )


_PARTS_QUERY: Select[Any] = select(
    PREDICTIONS.c.prediction, PREDICTIONS.c.observation, PREDICTIONS.c.basis
).where(PREDICTIONS.c.id == bindparam("pid"))
_INSERT_JTI: Insert = insert(JTI)
_INSERT_AUDIT: Insert = insert(AUDIT)


@dataclass(frozen=True)
class CaseSnapshot:
    """Everything known about one case, read in one transaction.

    ``provenance`` and ``features`` are the current revision's payload read back through the
    results contract (``models.contract``); ``provenance`` is None for a row stored before it.
    """

    result: Result
    revision: ResultRevision
    descriptors: DescriptorEntry | None
    prediction: PredictionRow | None
    provenance: Provenance | None
    features: dict[str, float | None]


class Store:
    """Database operations on a session factory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        self.engine: Engine = engine
        self.write_gate = WriteGate.for_engine(engine)

    # --- results -----------------------------------------------------------------------
    def ingest_result(self, payload: ResultPayload) -> tuple[str, IngestStatus]:
        """Store a published result; idempotent per (series, pipeline_version)."""
        body = payload.to_json()
        digest = canonical_hash(body)
        return _retry_on_conflict(lambda: self._ingest(payload, body, digest), attempts=2)

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
            result.laterality = payload.laterality.value if payload.laterality else None
            result.updated_at = now
            s.flush()
            s.add(
                ResultRevision(
                    result_id=result.id,
                    revision=result.revision,
                    study_instance_uid=payload.study_instance_uid,
                    accession_number=payload.accession_number or None,
                    acquired_at=payload.acquired_at,
                    laterality=payload.laterality.value if payload.laterality else None,
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
                provenance=Provenance.stored(revision.provenance),
                features=read_features(revision.features),
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

    def hook_rows(self, keys: Iterable[tuple[str, str]]) -> list[HookRow]:
        """Results of (issuer, PatientID) keys with their latest prediction's key, in one query.

        Core, not ORM, and a prebuilt statement: this is the hot path of every patient-view call.
        """
        pairs = list(keys)
        if not pairs:
            return []
        params: dict[str, str] = {}
        for k, (issuer, value) in enumerate(pairs):
            params[f"i{k}"] = issuer
            params[f"v{k}"] = value
        with self.engine.connect() as conn:
            rows = conn.execute(_hook_query(len(pairs)), params)
            return [HookRow(*row) for row in rows]

    def prediction_parts(self, prediction_id: int) -> PredictionParts | None:
        """The JSON columns of one prediction (read once per worker per prediction)."""
        with self.engine.connect() as conn:
            row = conn.execute(_PARTS_QUERY, {"pid": prediction_id}).first()
        return None if row is None else PredictionParts(row[0], row[1], row[2])

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

        def append() -> int:
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

        return _retry_on_conflict(append, attempts=3)

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
        """Store feedback; repeats (same card, outcome, timestamp) are ignored. → (new, repeats).

        All or nothing: a card no prediction issued raises UnknownCardError and nothing of the
        batch is stored, so made-up card ids never sit beside real feedback.
        """
        return _retry_on_conflict(lambda: self._record_feedback(items, actor), attempts=2)

    def _record_feedback(self, items: Sequence[FeedbackItem], actor: str) -> tuple[int, int]:
        new = repeats = 0
        with self.sessions.begin() as s:
            for index, item in enumerate(items):
                result_id = s.scalar(
                    select(PredictionRow.result_id).where(PredictionRow.card_uuid == item.card)
                )
                if result_id is None:
                    raise UnknownCardError(index, item.card)  # rolls the whole batch back
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

    def audit_many(self, events: Sequence[AuditTuple]) -> None:
        """Append audit events in one transaction (Core insert: also on the hook's hot path)."""
        if events:
            self.record_call(None, events)

    def record_call(self, token: UsedToken | None, events: Sequence[AuditTuple]) -> bool:
        """Record a token's jti and the call's audit events in ONE transaction.

        False (and nothing written) if the jti was seen before: a replay. The unique key, not a
        read, decides, so concurrent workers and instances sharing the database agree. One commit
        instead of two is what makes this worth having on the hook path.
        """
        now = utcnow()
        rows = [
            {"at": now, "actor": a, "action": act, "result_id": rid, "detail": d}
            for a, act, rid, d in events
        ]
        if token is None and not rows:
            return True
        try:
            with self.write_gate(), self.engine.begin() as conn:
                if token is not None:
                    try:
                        conn.execute(
                            _INSERT_JTI, {"iss": token.iss, "jti": token.jti, "exp": token.expires}
                        )
                    except IntegrityError:
                        raise _Replayed from None
                if rows:
                    conn.execute(_INSERT_AUDIT, rows)
        except _Replayed:
            return False
        if token is not None and uuid.uuid4().int % 256 == 0:  # amortised purge, no scheduler
            with self.write_gate(), self.engine.begin() as conn:
                conn.execute(delete(JTI).where(JTI.c.exp < now))
        return True

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
        return self.record_call(UsedToken.of(iss, jti, exp, leeway), ())
