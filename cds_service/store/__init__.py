"""Persistence operations of the service (one place that writes the database).

Every write is one short transaction; uniqueness constraints (not read-then-write) decide
idempotence under concurrent workers. Nothing here knows about HTTP or FHIR.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cds_service.audit import AuditAction
from cds_service.case_state import CaseState
from cds_service.orm import (
    AuditEvent,
    DescriptorEntry,
    Feedback,
    PathologyResult,
    PredictionRow,
    Result,
    ResultRevision,
    utcnow,
)
from cds_service.schema import FeedbackItem
from cds_service.store.exports import AssessmentRow, PacsStore
from cds_service.store.hook_path import GENERATION_NOW, HookConnection, HookStatements, Recorded
from cds_service.store.tables import AUDIT, JTI, PREDICTIONS, RESULTS
from cds_service.store.values import (
    AuditQuery,
    AuditTuple,
    BoardDecision,
    CaseSnapshot,
    ConcordanceRow,
    Her2Pathology,
    HookLookup,
    HookRow,
    IngestStatus,
    NotFoundError,
    ObservationStatus,
    PathologySource,
    PredictionParts,
    ReviewFlag,
    StaleLookupError,
    UnknownCardError,
    UsedToken,
    canonical_hash,
    json_safe,
)
from cds_service.store.worklist import (
    _SORT_COLUMNS,
    _WORKLIST_COLUMNS,
    WorklistPage,
    WorklistQuery,
    WorklistRow,
    WorklistSort,
    _refresh_worklist,
    _worklist_filters,
)
from cds_service.store.write_gate import WriteGate, retry_on_conflict
from models.contract import Provenance, ResultPayload, read_features

__all__ = [
    "AssessmentRow",
    "AuditQuery",
    "AuditTuple",
    "BoardDecision",
    "CaseSnapshot",
    "ConcordanceRow",
    "Her2Pathology",
    "HookLookup",
    "HookRow",
    "IngestStatus",
    "NotFoundError",
    "ObservationStatus",
    "PacsStore",
    "PathologySource",
    "PredictionParts",
    "ReviewFlag",
    "StaleLookupError",
    "Store",
    "UnknownCardError",
    "UsedToken",
    "WorklistPage",
    "WorklistQuery",
    "WorklistRow",
    "WorklistSort",
    "WriteGate",
    "canonical_hash",
    "json_safe",
]

log = logging.getLogger(__name__)


class _Replayed(Exception):
    """Internal: the jti insert hit the unique key; rolls back the whole call transaction."""


def _write_call(
    conn: Connection, token: UsedToken | None, rows: list[dict[str, Any]], generation: int | None
) -> None:
    """The jti insert (``_Replayed`` on its unique key) and the audit rows, in ``conn``'s tx.

    ``generation``: first check the reused lookup's generation (``StaleLookupError``).
    """
    if generation is not None and conn.scalar(select(GENERATION_NOW)) != generation:
        raise StaleLookupError
    if token is not None:
        try:
            conn.execute(_INSERT_JTI, {"iss": token.iss, "jti": token.jti, "exp": token.expires})
        except IntegrityError:
            raise _Replayed from None
    if rows:
        conn.execute(_INSERT_AUDIT, rows)
        flagged = {
            r["result_id"]
            for r in rows
            if r["action"] == AuditAction.DISCORDANCE_DETECTED and r["result_id"]
        }
        if flagged:  # the worklist's flag (rare: only on a discordant call)
            conn.execute(
                update(RESULTS)
                .where(RESULTS.c.id.in_(flagged), RESULTS.c.discordant.is_(False))
                .values(discordant=True)
            )


_PARTS_QUERY: Select[Any] = select(
    PREDICTIONS.c.prediction, PREDICTIONS.c.observation, PREDICTIONS.c.basis
).where(PREDICTIONS.c.id == bindparam("pid"))
_INSERT_JTI: Insert = insert(JTI)
_INSERT_AUDIT: Insert = insert(AUDIT)


class Store:
    """Database operations on a session factory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        self.engine: Engine = engine
        self.write_gate = WriteGate.for_engine(engine)

    @functools.cached_property
    def pacs(self) -> PacsStore:
        """Results in the PACS: the node's export states and the assessments it polls."""
        return PacsStore(self.sessions)

    # --- results -----------------------------------------------------------------------
    def ingest_result(self, payload: ResultPayload) -> tuple[str, IngestStatus]:
        """Store a published result; idempotent per (series, pipeline_version)."""
        body = payload.to_json()
        digest = canonical_hash(body)
        return retry_on_conflict(lambda: self._ingest(payload, body, digest), attempts=2)

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
            result.patient_name = payload.patient.name or None
            result.study_date = payload.study_date or payload.acquired_at.date()
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
                    action=AuditAction.result(status.value),
                    result_id=result.id,
                    detail={"revision": result.revision, "series": payload.series_instance_uid},
                )
            )
            _refresh_worklist(s, result)
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

    @functools.cached_property
    def hook_statements(self) -> HookStatements:
        """The hook call's statements compiled for this engine's dialect (``hook_path``)."""
        return HookStatements(self.engine.dialect)

    def hook_connection(self) -> HookConnection:
        """A pooled connection for one hook call: its lookup, then its jti + audit write.

        On PostgreSQL it runs in autocommit: the lookup needs no BEGIN/ROLLBACK and the write is
        one atomic statement (``hook_path``), three round trips with the pool's ping where two
        transactions took nine. SQLite keeps its transaction behind the write gate.
        """
        return HookConnection(self.engine)

    def hook_rows(
        self,
        keys: Iterable[tuple[str, str]],
        conn: HookConnection | None = None,
        *,
        generation: bool = True,
    ) -> HookLookup:
        """Results of (issuer, PatientID) keys with their latest prediction's key, and the
        lookup's generation (for reusing it while nothing changed; ``generation=False``: not
        read, for a lookup nobody will reuse).

        The hot path of every patient-view call, on the driver's cursor (``hook_path``).
        ``conn``: the hook call's connection (``record_call`` then commits on it), so one call
        checks out one pooled connection, not two.
        """
        own = conn or self.hook_connection()
        try:
            return self.hook_statements.lookup(own.dbapi, keys, generation=generation)
        finally:
            if conn is None:
                own.close()

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
                s.add(
                    AuditEvent(
                        actor=actor, action=AuditAction(flag.value), result_id=rid, detail=detail
                    )
                )

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
                        action=AuditAction.DESCRIPTORS_ENTERED,
                        result_id=result_id,
                        detail={"version": version, "roi_confirmed": roi_confirmed},
                    )
                )
                _refresh_worklist(s, result_id)
                return version

        return retry_on_conflict(append, attempts=3)

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
            result.board_decision = decision.value
            s.add(
                AuditEvent(
                    actor=reviewer,
                    action=AuditAction.board(decision.value),
                    result_id=result_id,
                    detail={"reason": reason, "comment": comment}
                    if comment
                    else {"reason": reason},
                )
            )
            _refresh_worklist(s, result)

    def save_prediction(self, row: PredictionRow) -> PredictionRow:
        with self.sessions.begin() as s:
            s.add(row)
            s.flush()
            result = s.get(Result, row.result_id)
            if result is not None:
                result.likelihood = row.probability
                data = row.prediction or {}
                threshold = data.get("threshold")
                result.above_threshold = (
                    row.probability >= threshold
                    if row.probability is not None and isinstance(threshold, int | float)
                    else None
                )
                result.scored_by = (
                    f"{data.get('model_name')} {data.get('model_version')} ({data.get('variant')})"[
                        :160
                    ]
                    if data
                    else None
                )
                _refresh_worklist(s, result)
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
        return retry_on_conflict(lambda: self._record_feedback(items, actor), attempts=2)

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
                        action=AuditAction.feedback(item.outcome.value),
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

    def record_call(
        self,
        token: UsedToken | None,
        events: Sequence[AuditTuple],
        conn: HookConnection | None = None,
        generation: int | None = None,
    ) -> bool:
        """Record a token's jti and the call's audit events in ONE transaction.

        False (and nothing written) if the jti was seen before: a replay. The unique key, not a
        read, decides, so concurrent workers and instances sharing the database agree. One commit
        instead of two is what makes this worth having on the hook path. ``conn``: the hook
        call's connection (its lookup already ran on it); committed, or rolled back on a replay
        or an error, here. ``generation``: the call answered from a reused lookup of that
        generation; if the database's is another, nothing is written (``StaleLookupError``).
        """
        now = utcnow()
        rows = [
            {"at": now, "actor": a, "action": act, "result_id": rid, "detail": d}
            for a, act, rid, d in events
        ]
        if token is None and not rows and generation is None:
            return True
        flagged = any(r["action"] == AuditAction.DISCORDANCE_DETECTED for r in rows)
        try:
            if conn is not None and token is not None and not flagged:  # the hot path
                with contextlib.nullcontext() if conn.autocommit else self.write_gate():
                    outcome = self.hook_statements.record(
                        conn.dbapi, token, rows, generation, autocommit=conn.autocommit
                    )
                if outcome is Recorded.REPLAYED:
                    raise _Replayed
                if outcome is Recorded.STALE:
                    raise StaleLookupError
            else:  # a discordant call also sets the worklist flag; or auth off (development)
                with self.write_gate(), self.engine.begin() as own:
                    _write_call(own, token, rows, generation)
        except _Replayed:
            return False
        if token is not None and random.random() < 1 / 256:  # amortised purge, no scheduler
            with self.write_gate(), self.engine.begin() as purge:
                purge.execute(delete(JTI).where(JTI.c.exp < now))
        return True

    def discordant_results(self) -> set[str]:
        """Cases for which a hook call saw biopsy HER2 0 with an estimate at/above threshold."""
        with self.sessions() as s:
            return set(
                s.scalars(
                    select(AuditEvent.result_id)
                    .where(AuditEvent.action == AuditAction.DISCORDANCE_DETECTED)
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

    def audit_events(self, query: AuditQuery, limit: int = 500) -> list[AuditEvent]:
        """Audit events matching ``query``, newest first (the admin page and its CSV)."""
        stmt = select(AuditEvent)
        if query.actor:
            stmt = stmt.where(AuditEvent.actor == query.actor)
        if query.action:
            stmt = stmt.where(AuditEvent.action == query.action.value)
        if query.since:
            stmt = stmt.where(AuditEvent.at >= query.since)
        if query.until:
            stmt = stmt.where(AuditEvent.at < query.until)
        if query.result_id:
            stmt = stmt.where(AuditEvent.result_id == query.result_id)
        with self.sessions() as s:
            return list(s.scalars(stmt.order_by(AuditEvent.id.desc()).limit(limit)))

    def audit_actors(self) -> list[str]:
        """Every actor name in the audit (the filter's choices)."""
        with self.sessions() as s:
            return list(s.scalars(select(AuditEvent.actor).distinct().order_by(AuditEvent.actor)))

    # --- pathology and concordance ------------------------------------------------------
    def add_pathology(
        self,
        result_id: str,
        her2: Her2Pathology,
        *,
        score: str,
        source: PathologySource,
        source_key: str,
        entered_by: str,
        reported_at: datetime,
        comment: str | None = None,
    ) -> bool:
        """Record a pathology HER2 result (audited); False if this source key was seen."""
        action = (
            AuditAction.PATHOLOGY_ENTERED
            if source is PathologySource.PATHOLOGIST
            else AuditAction.PATHOLOGY_RECEIVED
        )
        try:
            with self.sessions.begin() as s:
                if s.get(Result, result_id) is None:
                    raise NotFoundError(result_id)
                s.add(
                    PathologyResult(
                        result_id=result_id,
                        her2=her2.value,
                        score=score[:32],
                        source=source.value,
                        source_key=source_key[:128],
                        entered_by=entered_by[:256],
                        reported_at=reported_at,
                        comment=comment,
                    )
                )
                s.add(
                    AuditEvent(
                        actor=entered_by[:256],
                        action=action,
                        result_id=result_id,
                        detail={"her2": her2.value, "score": score[:32], "source": source.value},
                    )
                )
                _refresh_worklist(s, result_id)
        except IntegrityError:
            return False
        return True

    def pathology_for(self, result_id: str) -> list[PathologyResult]:
        """The case's pathology results, latest report first."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(PathologyResult)
                    .where(PathologyResult.result_id == result_id)
                    .order_by(PathologyResult.reported_at.desc(), PathologyResult.id.desc())
                )
            )

    def concordance_rows(self) -> list[ConcordanceRow]:
        """Every case with pathology: its latest report against its latest prediction."""
        with self.sessions() as s:
            reports = list(
                s.scalars(
                    select(PathologyResult).order_by(
                        PathologyResult.result_id,
                        PathologyResult.reported_at.desc(),
                        PathologyResult.id.desc(),
                    )
                )
            )
            latest: dict[str, PathologyResult] = {}
            for report in reports:
                latest.setdefault(report.result_id, report)
            rows = []
            for result_id, report in latest.items():
                result = s.get(Result, result_id)
                if result is None:
                    continue
                revision = s.scalar(
                    select(ResultRevision).where(
                        ResultRevision.result_id == result_id,
                        ResultRevision.revision == result.revision,
                    )
                )
                prediction = self._latest_prediction(s, result_id)
                rows.append(
                    ConcordanceRow(
                        result_id=result_id,
                        acquired_at=result.acquired_at,
                        probability=prediction.probability if prediction else None,
                        prediction=prediction.prediction if prediction else None,
                        her2=Her2Pathology(report.her2),
                        score=report.score,
                        reported_at=report.reported_at,
                        features=dict(revision.features) if revision else {},
                        provenance=dict(revision.provenance) if revision else {},
                    )
                )
        return rows

    def feature_rows(self, limit: int = 20000) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(features, provenance) of every case's current revision (drift per scanner)."""
        with self.sessions() as s:
            rows = s.execute(
                select(ResultRevision.features, ResultRevision.provenance)
                .join(
                    Result,
                    and_(
                        Result.id == ResultRevision.result_id,
                        Result.revision == ResultRevision.revision,
                    ),
                )
                .limit(limit)
            )
            return [(dict(f or {}), dict(p or {})) for f, p in rows]

    def latest_predictions(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(result id, prediction JSON) of every case's latest prediction row."""
        p = PREDICTIONS
        latest = select(func.max(p.c.id)).group_by(p.c.result_id)
        with self.engine.connect() as conn:
            rows = conn.execute(select(p.c.result_id, p.c.prediction).where(p.c.id.in_(latest)))
            return [(rid, pred) for rid, pred in rows]

    # --- the worklist -------------------------------------------------------------------
    def worklist_page(self, query: WorklistQuery) -> WorklistPage:
        """One page of the worklist with its total and per-state counts (three indexed reads)."""
        column = _SORT_COLUMNS[query.sort]
        order = column.desc() if query.descending else column.asc()
        where = _worklist_filters(query, with_state=True)
        stmt = (
            select(*_WORKLIST_COLUMNS)
            .where(*where)
            .order_by(order.nulls_last(), RESULTS.c.acquired_at.desc(), RESULTS.c.id)
            .limit(max(1, min(query.limit, 1000)))
            .offset(max(0, query.offset))
        )
        counts_stmt = (
            select(RESULTS.c.state, func.count())
            .where(*_worklist_filters(query, with_state=False))
            .group_by(RESULTS.c.state)
        )
        with self.engine.connect() as conn:
            rows = [
                WorklistRow(*row[:10], CaseState(row[10]), bool(row[11]), *row[12:])
                for row in conn.execute(stmt)
            ]
            total = conn.execute(select(func.count()).select_from(RESULTS).where(*where)).scalar()
            counts = {st: 0 for st in CaseState}
            for state_value, n in conn.execute(counts_stmt):
                counts[CaseState(state_value)] = int(n)
        return WorklistPage(rows=rows, total=int(total or 0), counts=counts)

    def current_revision(self, result_id: str) -> int | None:
        """The case's current revision number (a light read: the preview cache's key)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(RESULTS.c.revision).where(RESULTS.c.id == result_id)
            ).scalar()

    def board_dates(self, limit: int = 60) -> list[tuple[date, int]]:
        """Board dates with the number of cases assigned to each, latest first."""
        stmt = (
            select(RESULTS.c.board_date, func.count())
            .where(RESULTS.c.board_date.is_not(None))
            .group_by(RESULTS.c.board_date)
            .order_by(RESULTS.c.board_date.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(d, int(n)) for d, n in conn.execute(stmt)]

    def mark_viewed(self, result_id: str, actor: str) -> None:
        """Audit a case view; the first one moves a new case to "descriptors needed"."""
        with self.sessions.begin() as s:
            result = s.get(Result, result_id)
            if result is None:
                raise NotFoundError(result_id)
            s.add(AuditEvent(actor=actor, action=AuditAction.CASE_VIEWED, result_id=result_id))
            if result.first_viewed_at is None:
                result.first_viewed_at = utcnow()
                _refresh_worklist(s, result)

    def confirm_roi(self, result_id: str, actor: str) -> int:
        """The radiologist confirms the tumour ROI: its own audited act, kept as a descriptors
        version with the same values and ``roi_confirmed`` set; returns that version."""

        def append() -> int:
            with self.sessions.begin() as s:
                if s.get(Result, result_id) is None:
                    raise NotFoundError(result_id)
                latest = self._latest_descriptors(s, result_id)
                version = (latest.version if latest else 0) + 1
                s.add(
                    DescriptorEntry(
                        result_id=result_id,
                        version=version,
                        entered_by=latest.entered_by if latest else actor,
                        values=dict(latest.values) if latest else {},
                        roi_confirmed=True,
                    )
                )
                s.add(
                    AuditEvent(
                        actor=actor,
                        action=AuditAction.ROI_CONFIRMED,
                        result_id=result_id,
                        detail={"version": version},
                    )
                )
                _refresh_worklist(s, result_id)
                return version

        return retry_on_conflict(append, attempts=3)

    def set_board_date(self, result_id: str, when: date | None, actor: str) -> None:
        """Assign a case to a tumour-board date (None: unassign); audited."""
        with self.sessions.begin() as s:
            result = s.get(Result, result_id)
            if result is None:
                raise NotFoundError(result_id)
            result.board_date = when
            s.add(
                AuditEvent(
                    actor=actor,
                    action=AuditAction.BOARD_DATE_SET,
                    result_id=result_id,
                    detail={"board_date": when.isoformat() if when else None},
                )
            )

    def use_jti(self, iss: str, jti: str, exp: int, leeway: int) -> bool:
        """Record a token id; False if it was seen before (replay). Purges expired ids."""
        return self.record_call(UsedToken.of(iss, jti, exp, leeway), ())
