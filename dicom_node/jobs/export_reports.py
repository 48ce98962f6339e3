"""Export states → service: each series' export states, ``PUT`` to ``/api/v1/exports``.

Every change of an export's state (scheduled, sending, sent, failed and re-queued, dead,
re-queued by ``her2low export retry``) bumps the export row's ``updated_at``. The table
``export_reports`` remembers, per export, the ``updated_at`` last reported; an export whose value
differs is *unreported*, and its series' :class:`ExportReport` is sent. Nothing is kept in
memory: when the service is down the rows simply stay unreported and are caught up when it
answers again. Reporting reads the export rows and never writes them, so it can neither block
nor fail a send or an analysis.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs.export import Export, ExportState
from dicom_node.jobs.publish import PublishError
from dicom_node.jobs.results_client import ResultsClient
from dicom_node.jobs.results_state import ExportReported, MeasurementReportRecord
from models.contract import API_VERSION, ExportReport, ExportStatus

__all__ = ["export_report", "report_exports", "unreported_series"]

log = logging.getLogger(__name__)

#: Unknown pipeline version of exports queued before the node recorded its SRs.
_UNKNOWN_PIPELINE = "unknown"


def unreported_series(sessions: sessionmaker[Session], *, limit: int = 50) -> list[str]:
    """Series with an export whose current state the service has not been told (oldest first)."""
    with sessions() as session:
        rows = session.execute(
            select(Export.source_series_uid, Export.id)
            .outerjoin(ExportReported, ExportReported.export_id == Export.id)
            .where(
                (ExportReported.export_id.is_(None))
                | (ExportReported.reported_updated_at != Export.updated_at)
            )
            .order_by(Export.updated_at, Export.id)
        ).all()
    out: list[str] = []
    for series_uid, _ in rows:
        if series_uid not in out:
            out.append(series_uid)
        if len(out) >= limit:
            break
    return out


_SEVERITY = {
    ExportState.DEAD: 3,
    ExportState.SENDING: 2,
    ExportState.PENDING: 1,
    ExportState.DONE: 0,
}


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _status(destination: str, rows: Sequence[Export]) -> ExportStatus:
    """One destination's copy of one analysis: its batches (original SR set + revisions)."""
    state = max((ExportState(r.state) for r in rows), key=_SEVERITY.__getitem__)
    worst = [r for r in rows if ExportState(r.state) is state]
    sent = [r.sent_at for r in rows if ExportState(r.state) is ExportState.DONE and r.sent_at]
    error = "" if state is ExportState.DONE else max(worst, key=lambda r: r.updated_at).last_error
    return ExportStatus(
        destination=destination[:64],
        state=state,
        attempts=max(r.attempts for r in worst),
        objects=sum(len(r.file_paths()) for r in rows),
        last_error=error[:500],
        updated_at=_utc(max(r.updated_at for r in rows)),
        sent_at=_utc(max(sent)) if sent else None,
    )


def export_report(
    sessions: sessionmaker[Session], series_uid: str
) -> tuple[ExportReport | None, dict[int, tuple[float, str]]]:
    """The series' report (its latest analysis, one status per destination) and the
    ``updated_at``/state of every export row of the series it accounts for."""
    with sessions() as session:
        exports = list(
            session.scalars(
                select(Export).where(Export.source_series_uid == series_uid).order_by(Export.id)
            )
        )
        records = list(
            session.scalars(
                select(MeasurementReportRecord).where(
                    MeasurementReportRecord.source_series_uid == series_uid
                )
            )
        )
        session.expunge_all()
    seen = {e.id: (e.updated_at, ExportState(e.state).value) for e in exports}
    if not exports:
        return None, seen
    analysis_of = {r.sop_instance_uid: r.original_uid for r in records}
    version_of = {r.original_uid: r.pipeline_version for r in records}
    latest = analysis_of.get(exports[-1].batch_key, exports[-1].batch_key)
    current = [e for e in exports if analysis_of.get(e.batch_key, e.batch_key) == latest]
    by_destination: dict[str, list[Export]] = {}
    for e in current:
        by_destination.setdefault(e.destination, []).append(e)
    report = ExportReport(
        api_version=API_VERSION,
        series_instance_uid=series_uid,
        pipeline_version=version_of.get(latest, _UNKNOWN_PIPELINE),
        exports=tuple(_status(d, rows) for d, rows in list(by_destination.items())[:32]),
    )
    return report, seen


def _mark(
    sessions: sessionmaker[Session], seen: dict[int, tuple[float, str]], refused: str
) -> None:
    now = time.time()
    with sessions() as session:
        for export_id, (updated_at, state) in seen.items():
            row = session.get(ExportReported, export_id)
            if row is None:
                row = ExportReported(export_id=export_id)
                session.add(row)
            row.reported_updated_at = updated_at
            row.reported_state = state
            row.reported_at = now
            row.refused = refused[:1000]
        try:
            session.commit()
        except IntegrityError:  # another worker marked it meanwhile: it reported too
            session.rollback()


def report_exports(
    sessions: sessionmaker[Session], client: ResultsClient, *, limit: int = 50
) -> tuple[int, int]:
    """Report every unreported series once; returns (reported, 1 if the service was down).

    Stops at the first transient failure (the service is down: the rest waits with it). A
    refusal (4xx) is logged and marked, so a report the service will never take is not sent
    again until the exports change.
    """
    reported = failed = 0
    for series_uid in unreported_series(sessions, limit=limit):
        try:
            report, seen = export_report(sessions, series_uid)
        except (ValidationError, ValueError) as exc:  # a row the contract cannot express
            log.error(
                "export report not built", extra={"series_uid": series_uid, "err": str(exc)[:300]}
            )
            continue
        if report is None:
            continue
        try:
            client.put_exports(report)
        except PublishError as exc:
            if exc.transient:
                failed = 1
                log.warning("export states not reported", extra={"err": str(exc)[:300]})
                break
            log.error(
                "service refused export states",
                extra={"series_uid": series_uid, "err": str(exc)[:300]},
            )
            _mark(sessions, seen, str(exc))
            continue
        _mark(sessions, seen, "")
        reported += 1
    return reported, failed
