"""Assessments → PACS: the service's newer assessments become revised SRs, queued to the PACS.

``GET /api/v1/assessments?since=…`` every ``node_assessment_poll_seconds``, the cursor (``until``
of the last page) kept in ``sync_state`` so a restart resumes where it stopped. For an assessment
of a series whose SR this node wrote (``measurement_reports``, :func:`record_original`), when
the descriptors or the likelihood differ from what its latest SR carried, a revised SR
(:mod:`dicom_node.analysis.outputs.revision`) is written beside the original and queued to the
same destinations. Its UID is derived from what it carries, so a re-run writes and sends the
same object. A page or an assessment that does not parse is logged and skipped; it never stops
the loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydantic import ValidationError
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs.export import Destination, Export, ExportConfig, schedule
from dicom_node.jobs.results_client import SyncConfig
from dicom_node.jobs.results_state import MeasurementReportRecord, SyncState
from models.contract import Assessment, AssessmentPage

__all__ = [
    "CURSOR",
    "REREAD_MARGIN",
    "Page",
    "apply_assessment",
    "get_cursor",
    "parse_page",
    "poll_assessments",
    "record_original",
    "set_cursor",
]

log = logging.getLogger(__name__)

CURSOR = "assessments_since"
#: How far behind the cursor each poll starts again (see :func:`poll_assessments`).
REREAD_MARGIN = dt.timedelta(minutes=2)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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
