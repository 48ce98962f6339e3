"""Keeping the service and the PACS in step with the node's result objects (issue 14).

Two directions, one loop (:func:`run_forever`, a thread of ``her2low worker`` beside the export
thread, so neither a slow service nor a slow PACS holds the other up):

**Export states → service.** Every change of an export's state (scheduled, sending, sent,
failed and re-queued, dead, re-queued by ``her2low export retry``) bumps the export row's
``updated_at``. The table ``export_reports`` remembers, per export, the ``updated_at`` last
reported; an export whose value differs is *unreported*, and its series' :class:`ExportReport`
is ``PUT`` to ``/api/v1/exports``. Nothing is kept in memory but a backoff: when the service is
down the rows simply stay unreported and are caught up when it answers again. Reporting reads
the export rows and never writes them, so it can neither block nor fail a send or an analysis.

**Assessments → PACS.** ``GET /api/v1/assessments?since=…`` every
``node_assessment_poll_seconds``, the cursor (``until`` of the last page) kept in ``sync_state``
so a restart resumes where it stopped. For an assessment of a series whose SR this node wrote
(``measurement_reports``), when the descriptors or the likelihood differ from what its latest SR
carried, a revised SR (:mod:`dicom_node.analysis.outputs.revision`) is written beside the
original and queued to the same destinations. Its UID is derived from what it carries, so a
re-run writes and sends the same object. A page or an assessment that does not parse is logged
and skipped; it never stops the loop.

All HTTP goes through :func:`dicom_node.jobs.publish.results_api` (the publisher's client).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydantic import ValidationError
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs.export import Destination, Export, ExportConfig, ExportState, schedule
from dicom_node.jobs.publish import PublishError, results_api
from dicom_node.jobs.results_state import ExportReported, MeasurementReportRecord, SyncState
from her2low.core.settings import Settings
from models.contract import (
    API_VERSION,
    Assessment,
    AssessmentPage,
    ExportReport,
    ExportStatus,
)

__all__ = [
    "ExportReported",
    "MeasurementReportRecord",
    "ResultsClient",
    "SyncConfig",
    "SyncState",
    "apply_assessment",
    "export_report",
    "parse_page",
    "poll_assessments",
    "record_original",
    "report_exports",
    "run_forever",
    "unreported_series",
]

log = logging.getLogger(__name__)

CURSOR = "assessments_since"
#: How far behind the cursor each poll starts again (see :func:`poll_assessments`).
REREAD_MARGIN = dt.timedelta(minutes=2)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Unknown pipeline version of exports queued before the node recorded its SRs.
_UNKNOWN_PIPELINE = "unknown"


# --- the SRs the node wrote ----------------------------------------------------------------


def record_original(
    sessions: sessionmaker[Session],
    *,
    series_uid: str,
    pipeline_version: str,
    sr: Dataset,
    path: Path,
) -> None:
    """Remember the SR written at analysis time (idempotent: a retried job records nothing)."""
    from dicom_node.analysis.outputs.revision import AssessmentContent

    uid = str(sr.SOPInstanceUID)
    with sessions() as session:
        if session.scalar(
            select(MeasurementReportRecord.id).where(
                MeasurementReportRecord.sop_instance_uid == uid
            )
        ):
            return
        session.add(
            MeasurementReportRecord(
                source_series_uid=series_uid,
                pipeline_version=pipeline_version,
                original_uid=uid,
                sop_instance_uid=uid,
                sr_series_uid=str(sr.SeriesInstanceUID),
                instance_number=int(sr.InstanceNumber),
                path=str(path),
                content_key=AssessmentContent().key(),
            )
        )
        try:
            session.commit()
        except IntegrityError:  # another worker recorded the same SR first
            session.rollback()


# --- the HTTP side -------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultsClient:
    """The service's results API, called with the results token (the publisher's client)."""

    base_url: str
    token: str
    timeout: float = 10.0

    def put_exports(self, report: ExportReport) -> None:
        results_api(
            "PUT",
            self.base_url,
            "/api/v1/exports",
            self.token,
            json_body=report.model_dump(mode="json"),
            timeout=self.timeout,
            accept=(200, 201, 204),
        )

    def get_assessments(self, since: dt.datetime, limit: int) -> Any:
        """The page's JSON as sent (parsed by :func:`parse_page`, which trusts nothing)."""
        response = results_api(
            "GET",
            self.base_url,
            "/api/v1/assessments",
            self.token,
            params={"since": since.isoformat().replace("+00:00", "Z"), "limit": str(limit)},
            timeout=self.timeout,
            accept=(200,),
        )
        try:
            return response.json()
        except ValueError as exc:
            raise PublishError("assessments: the answer is not JSON", transient=True) from exc


@dataclass(frozen=True)
class SyncConfig:
    """What the sync loop needs: the service, the destinations, the poll interval."""

    client: ResultsClient
    export: ExportConfig
    #: Seconds between assessment polls; 0 = no polling (export states are still reported).
    poll_seconds: float = 30.0
    page_size: int = 50

    @classmethod
    def from_settings(cls, settings: Settings, export: ExportConfig) -> SyncConfig:
        return cls(
            client=ResultsClient(settings.node_results_url, settings.results_token()),
            export=export,
            poll_seconds=settings.node_assessment_poll_seconds,
        )


# --- export states → service -----------------------------------------------------------------


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


@dataclass
class Backoff:
    """In-memory wait after the service failed: 5 s doubling to 5 min. Losing it on a restart
    costs one early attempt; the durable state is the unreported rows themselves."""

    base: float = 5.0
    cap: float = 300.0
    failures: int = 0
    until: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.until = now + min(self.cap, self.base * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures, self.until = 0, 0.0


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


# --- assessments → revised SR ----------------------------------------------------------------


def get_cursor(sessions: sessionmaker[Session]) -> dt.datetime:
    """Where the assessment poll resumes (the epoch the first time)."""
    with sessions() as session:
        row = session.get(SyncState, CURSOR)
    if row is None:
        return _EPOCH
    try:
        value = dt.datetime.fromisoformat(row.value)
    except ValueError:
        log.error("assessment cursor unreadable: starting over", extra={"value": row.value[:64]})
        return _EPOCH
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def set_cursor(sessions: sessionmaker[Session], value: dt.datetime) -> None:
    with sessions() as session:
        row = session.get(SyncState, CURSOR)
        if row is None:
            row = SyncState(name=CURSOR, value="")
            session.add(row)
        row.value = value.astimezone(dt.UTC).isoformat()
        row.updated_at = time.time()
        session.commit()


@dataclass(frozen=True)
class Page:
    """The usable part of one assessments page."""

    assessments: list[Assessment] = field(default_factory=list)
    until: dt.datetime | None = None
    #: What was skipped and why (no patient data: positions and pydantic error types).
    problems: list[str] = field(default_factory=list)


def parse_page(body: Any) -> Page:
    """Validate a page item by item: a bad assessment is skipped, the others are kept; a page
    without a valid ``until`` is unusable as a whole (the cursor cannot move)."""
    if not isinstance(body, dict):
        return Page(problems=[f"page is a {type(body).__name__}, not an object"])
    items = body.get("assessments")
    if not isinstance(items, list):
        return Page(problems=["page has no assessments list"])
    try:
        until = AssessmentPage.model_validate({"assessments": [], "until": body.get("until")}).until
    except ValidationError as exc:
        return Page(problems=[f"until: {_errors(exc)}"])
    good: list[Assessment] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            good.append(Assessment.model_validate(item))
        except ValidationError as exc:
            problems.append(f"assessment {i}: {_errors(exc)}")
    return Page(assessments=good, until=until, problems=problems)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in exc.errors()[:5])


def _content(assessment: Assessment) -> Any:
    from dicom_node.analysis.outputs.revision import AssessmentContent

    scored = assessment.probability is not None
    return AssessmentContent(
        descriptors={k: v for k, v in assessment.descriptors.items() if v},
        probability=assessment.probability,
        model_name=assessment.model_name,
        model_version=assessment.model_version,
        statement=assessment.statement,
        not_scored=() if scored else tuple(assessment.not_scored),
    )


def _read(path: str) -> Dataset:
    return pydicom.dcmread(path)


def apply_assessment(
    sessions: sessionmaker[Session], export: ExportConfig, assessment: Assessment
) -> str | None:
    """Write and queue the revised SR ``assessment`` calls for; returns its UID, or ``None``
    when there is nothing to do (not a series this node wrote an SR for, or nothing new)."""
    from dicom_node.analysis.outputs import ResultObjects
    from dicom_node.analysis.outputs.revision import revise_measurement_report, revision_uid

    R = MeasurementReportRecord
    with sessions() as session:
        original = session.scalars(
            select(R)
            .where(
                R.source_series_uid == assessment.series_instance_uid,
                R.pipeline_version == assessment.pipeline_version,
                R.instance_number == 1,
                R.sop_instance_uid == R.original_uid,
            )
            .order_by(R.id.desc())
            .limit(1)
        ).first()
        if original is None:
            return None
        latest = session.scalars(
            select(R)
            .where(R.original_uid == original.original_uid)
            .order_by(R.instance_number.desc())
            .limit(1)
        ).first()
        destinations = set(
            session.scalars(
                select(Export.destination).where(Export.batch_key == original.original_uid)
            )
        )
        session.expunge_all()
    assert latest is not None
    content = _content(assessment)
    if content.key() == latest.content_key:
        return None
    number = latest.instance_number + 1
    uid = revision_uid(original.original_uid, number, content)
    sr = revise_measurement_report(
        _read(original.path), _read(latest.path), content, instance_number=number
    )
    (path,) = ResultObjects(sr=sr, maps={}).write(Path(original.path).parent)
    with sessions() as session:
        session.add(
            R(
                source_series_uid=original.source_series_uid,
                pipeline_version=original.pipeline_version,
                original_uid=original.original_uid,
                sop_instance_uid=uid,
                sr_series_uid=original.sr_series_uid,
                instance_number=number,
                path=str(path),
                content_key=content.key(),
            )
        )
        try:
            session.commit()
        except IntegrityError:  # another worker wrote the same revision (same UID) first
            session.rollback()
            return None
        study_uid = str(sr.StudyInstanceUID)
    # the original's destinations, whatever their calling-AE filter says now
    targets: Iterable[Destination] = (
        replace(d, calling_aets=()) for d in export.destinations if d.name in destinations
    )
    schedule(
        sessions,
        destinations=targets,
        paths=[path],
        batch_key=uid,
        study_uid=study_uid,
        source_series_uid=original.source_series_uid,
        calling_aet="",
    )
    log.info(
        "revised SR written",
        extra={
            "series_uid": original.source_series_uid,
            "instance_number": number,
            "scored": assessment.probability is not None,
        },
    )
    return uid


def poll_assessments(
    sessions: sessionmaker[Session], config: SyncConfig, *, max_pages: int = 10
) -> tuple[int, int]:
    """Fetch pages from the cursor and apply them; returns (revised SRs, skipped items).

    The cursor moves to each usable page's ``until`` (never backwards) once its assessments
    were applied; a failing assessment is logged and skipped, not retried forever.
    """
    revised = skipped = 0
    # Re-read a margin behind the cursor: a service instance may commit a prediction whose
    # computed_at is older than one another instance committed first. Applying an assessment
    # twice is harmless (a revision is written only when the content differs).
    since = get_cursor(sessions) - REREAD_MARGIN
    for _ in range(max_pages):
        body = config.client.get_assessments(since, config.page_size)
        page = parse_page(body)
        for problem in page.problems:
            log.warning("assessment skipped", extra={"problem": problem[:300]})
        skipped += len(page.problems)
        if page.until is None:
            break
        for assessment in page.assessments:
            try:
                if apply_assessment(sessions, config.export, assessment):
                    revised += 1
            except Exception:  # a missing file, an odd value: this one, not the loop
                skipped += 1
                log.exception(
                    "revised SR not written",
                    extra={"series_uid": assessment.series_instance_uid},
                )
        if page.until > get_cursor(sessions):
            set_cursor(sessions, page.until)
        if len(page.assessments) + len(page.problems) < config.page_size or page.until <= since:
            break
        since = page.until
    return revised, skipped


# --- the loop --------------------------------------------------------------------------------


def run_forever(
    sessions: sessionmaker[Session],
    config: SyncConfig,
    stop: Callable[[], bool],
    *,
    tick: float = 1.0,
    retry_base: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The results-sync thread of ``her2low worker``: report states, poll, until ``stop()``.

    After a failure each side waits ``retry_base`` seconds, doubling up to 5 minutes.
    """
    reports, polls = Backoff(base=retry_base), Backoff(base=retry_base)
    next_poll = clock()
    while not stop():
        now = clock()
        if reports.ready(now):
            try:
                _, down = report_exports(sessions, config.client)
                if down:
                    reports.failed(now)
                else:
                    reports.succeeded()
            except Exception:  # the database or a bug: keep going, the state is durable
                log.exception("export state reporting failed")
                reports.failed(now)
        if config.poll_seconds > 0 and now >= next_poll and polls.ready(now):
            next_poll = now + config.poll_seconds
            try:
                poll_assessments(sessions, config)
                polls.succeeded()
            except PublishError as exc:
                log.warning("assessments not fetched", extra={"err": str(exc)[:300]})
                polls.failed(now)
            except Exception:
                log.exception("assessment poll failed")
                polls.failed(now)
        time.sleep(tick)


def start_thread(sessions: sessionmaker[Session], settings: Settings, export: ExportConfig) -> Any:
    """Start :func:`run_forever` as a daemon thread (the worker's wiring)."""
    import threading

    thread = threading.Thread(
        target=run_forever,
        args=(sessions, SyncConfig.from_settings(settings, export), lambda: False),
        name="results-sync",
        daemon=True,
    )
    thread.start()
    return thread
