"""Results in the PACS: the node's export states in, the service's assessments out.

Both directions speak ``models.contract`` (``ExportReport`` / ``ExportStatus`` from the node,
the rows behind ``Assessment`` to it). Nothing here knows about HTTP; the results blueprint
turns these records into the contract's JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session, sessionmaker

from cds_service.orm import DescriptorEntry, PacsExport, Result, utcnow
from cds_service.store.tables import PREDICTIONS, RESULTS
from cds_service.store.write_gate import retry_on_conflict
from models.contract import ExportReport, ExportState, ExportStatus

#: Largest count stored (a 32-bit INTEGER column on PostgreSQL); the contract has no upper bound.
_MAX_COUNT = 2**31 - 1
#: Most assessments one poll returns, and the default.
MAX_ASSESSMENTS = 500
DEFAULT_ASSESSMENTS = 100

_DESCRIPTORS = DescriptorEntry.__table__


@dataclass(frozen=True)
class AssessmentRow:
    """A case's current prediction with what the node writes into its revised report."""

    prediction_id: int
    result_id: str
    series_instance_uid: str
    pipeline_version: str
    revision: int
    descriptors_version: int | None
    descriptors: Mapping[str, Any] | None
    prediction: Mapping[str, Any] | None
    probability: float | None
    error: str | None
    basis: Mapping[str, Any] | None
    computed_at: datetime


def _status(row: PacsExport) -> ExportStatus:
    return ExportStatus(
        destination=row.destination,
        state=ExportState(row.state),
        attempts=row.attempts,
        objects=row.objects,
        last_error=row.last_error,
        updated_at=row.updated_at,
        sent_at=row.sent_at,
    )


class PacsStore:
    """Export states per (result, destination) and the assessment poll, on the store's sessions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    # --- node → service: export states --------------------------------------------------
    def record_exports(self, report: ExportReport) -> tuple[str, list[ExportStatus]] | None:
        """Keep each destination's newest state; returns (result id, all stored states).

        None when no result has the report's (series, pipeline version). A state whose
        ``updated_at`` is older than the stored one is ignored (out-of-order delivery); an equal
        one replaces it (a re-sent report is idempotent). Concurrent first reports of one
        destination meet on the unique key and the loser retries as an update.
        """
        return retry_on_conflict(lambda: self._record(report), attempts=3)

    def _record(self, report: ExportReport) -> tuple[str, list[ExportStatus]] | None:
        now = utcnow()
        with self.sessions.begin() as s:
            result_id = s.scalar(
                select(Result.id).where(
                    Result.series_instance_uid == report.series_instance_uid,
                    Result.pipeline_version == report.pipeline_version,
                )
            )
            if result_id is None:
                return None
            stored = {
                row.destination: row
                for row in s.scalars(select(PacsExport).where(PacsExport.result_id == result_id))
            }
            for status in _newest_per_destination(report.exports):
                row = stored.get(status.destination)
                if row is not None and status.updated_at < row.updated_at:
                    continue  # an older report arriving late
                if row is None:
                    row = PacsExport(result_id=result_id, destination=status.destination)
                    s.add(row)
                    stored[status.destination] = row
                row.state = status.state.value
                row.attempts = min(status.attempts, _MAX_COUNT)
                row.objects = min(status.objects, _MAX_COUNT)
                row.last_error = status.last_error
                row.updated_at = status.updated_at
                row.sent_at = status.sent_at
                row.received_at = now
            s.flush()
            return result_id, [_status(stored[name]) for name in sorted(stored)]

    def exports_for(self, result_id: str) -> list[ExportStatus]:
        """The stored states of a case's destinations, by destination name (the case page)."""
        with self.sessions() as s:
            rows = s.scalars(
                select(PacsExport)
                .where(PacsExport.result_id == result_id)
                .order_by(PacsExport.destination)
            )
            return [_status(row) for row in rows]

    # --- service → node: assessments ----------------------------------------------------
    def assessments(self, since: datetime | None, limit: int) -> list[AssessmentRow]:
        """Current predictions computed after ``since`` (exclusive), oldest first, ≤ ``limit``.

        A case counts once, with its latest prediction. The page never ends between two rows of
        the same ``computed_at``: the node resumes from the last one returned (exclusive), so a
        split tie would lose a row. When a full page would end inside a tie, that tie is left
        for the next poll; only a tie longer than the whole page is returned in full.
        """
        limit = max(1, min(limit, MAX_ASSESSMENTS))
        p, r, d = PREDICTIONS, RESULTS, _DESCRIPTORS
        newer = PREDICTIONS.alias("newer")
        stmt = (
            select(
                p.c.id,
                p.c.result_id,
                r.c.series_instance_uid,
                r.c.pipeline_version,
                p.c.revision,
                p.c.descriptors_version,
                d.c["values"],
                p.c.prediction,
                p.c.probability,
                p.c.error,
                p.c.basis,
                p.c.computed_at,
            )
            .select_from(
                p.join(r, r.c.id == p.c.result_id).outerjoin(
                    d,
                    and_(d.c.result_id == p.c.result_id, d.c.version == p.c.descriptors_version),
                )
            )
            .where(
                ~exists().where(newer.c.result_id == p.c.result_id, newer.c.id > p.c.id),
            )
            .order_by(p.c.computed_at, p.c.id)
        )
        if since is not None:
            stmt = stmt.where(p.c.computed_at > since)
        with self.sessions() as s:
            rows = [AssessmentRow(*tuple(row)) for row in s.execute(stmt.limit(limit + 1))]
            if len(rows) > limit and rows[limit].computed_at == rows[limit - 1].computed_at:
                tie = rows[limit].computed_at
                before = [row for row in rows[:limit] if row.computed_at != tie]
                if before:
                    return before
                rows = [
                    AssessmentRow(*tuple(row))
                    for row in s.execute(stmt.where(p.c.computed_at == tie))
                ]
                return rows
        return rows[:limit]


def _newest_per_destination(statuses: tuple[ExportStatus, ...]) -> list[ExportStatus]:
    """One state per destination: the newest when a report names a destination twice."""
    newest: dict[str, ExportStatus] = {}
    for status in statuses:
        kept = newest.get(status.destination)
        if kept is None or status.updated_at >= kept.updated_at:
            newest[status.destination] = status
    return list(newest.values())
