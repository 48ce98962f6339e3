"""Worklist queries: filters, sorting and the per-case state column the worklist indexes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from cds_service.audit import AuditAction
from cds_service.case_state import CaseFacts, CaseState, descriptors_complete, is_discordant
from cds_service.orm import (
    AuditEvent,
    DescriptorEntry,
    PathologyResult,
    Result,
)
from cds_service.store.tables import RESULTS
from cds_service.store.values import (
    Her2Pathology,
    ObservationStatus,
)

# --- the worklist (cds_service.review.worklist) ------------------------------------------------


class WorklistSort(StrEnum):
    """Columns the worklist sorts by (whitelisted: a query string never names a column)."""

    STUDY_DATE = "study-date"
    LIKELIHOOD = "likelihood"
    PATIENT = "patient"
    STATE = "state"
    BOARD_DATE = "board-date"
    ACCESSION = "accession"


_SORT_COLUMNS: dict[WorklistSort, Any] = {
    WorklistSort.STUDY_DATE: RESULTS.c.study_date,
    WorklistSort.LIKELIHOOD: RESULTS.c.likelihood,
    WorklistSort.PATIENT: RESULTS.c.patient_name,
    WorklistSort.STATE: RESULTS.c.state,
    WorklistSort.BOARD_DATE: RESULTS.c.board_date,
    WorklistSort.ACCESSION: RESULTS.c.accession_number,
}


@dataclass(frozen=True)
class WorklistQuery:
    """Filters, sort and page of the worklist (None: any). Likelihoods are 0–1, ``below`` open."""

    states: tuple[CaseState, ...] = ()
    since: date | None = None
    until: date | None = None  # inclusive
    likelihood_at_least: float | None = None
    likelihood_below: float | None = None
    lesion_type: str | None = None  # "mass" | "nme" | "unknown"
    discordant_only: bool = False
    board_date: date | None = None
    sort: WorklistSort = WorklistSort.STUDY_DATE
    descending: bool = True
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class WorklistRow:
    """One worklist line: light columns of ``results`` only (no JSON is read)."""

    result_id: str
    patient_name: str | None
    patient_id: str
    patient_issuer: str
    accession_number: str | None
    study_date: date | None
    laterality: str | None
    lesion_type: str | None
    likelihood: float | None
    above_threshold: bool | None
    state: CaseState
    discordant: bool
    board_date: date | None
    review_flag: str | None
    scored_by: str | None


@dataclass(frozen=True)
class WorklistPage:
    """A page of rows, the number of matches and the count per state (other filters applied)."""

    rows: list[WorklistRow]
    total: int
    counts: dict[CaseState, int]


_WORKLIST_COLUMNS = (
    RESULTS.c.id,
    RESULTS.c.patient_name,
    RESULTS.c.patient_id,
    RESULTS.c.patient_issuer,
    RESULTS.c.accession_number,
    RESULTS.c.study_date,
    RESULTS.c.laterality,
    RESULTS.c.lesion_type,
    RESULTS.c.likelihood,
    RESULTS.c.above_threshold,
    RESULTS.c.state,
    RESULTS.c.discordant,
    RESULTS.c.board_date,
    RESULTS.c.review_flag,
    RESULTS.c.scored_by,
)


def _worklist_filters(query: WorklistQuery, *, with_state: bool) -> list[Any]:
    r = RESULTS.c
    where: list[Any] = []
    if with_state and query.states:
        where.append(r.state.in_([st.value for st in query.states]))
    if query.since is not None:
        where.append(r.study_date >= query.since)
    if query.until is not None:
        where.append(r.study_date <= query.until)
    if query.likelihood_at_least is not None:
        where.append(r.likelihood >= query.likelihood_at_least)
    if query.likelihood_below is not None:
        where.append(r.likelihood < query.likelihood_below)
    if query.lesion_type == "unknown":
        where.append(r.lesion_type.is_(None))
    elif query.lesion_type:
        where.append(r.lesion_type == query.lesion_type)
    if query.discordant_only:
        where.append(r.discordant.is_(True))
    if query.board_date is not None:
        where.append(r.board_date == query.board_date)
    return where


def _refresh_worklist(s: Session, result: Result | str) -> None:
    """Re-derive the worklist columns of one case inside the caller's transaction."""
    if isinstance(result, str):
        found = s.get(Result, result)
        if found is None:
            return
        result = found
    s.flush()
    entry = s.scalar(
        select(DescriptorEntry)
        .where(DescriptorEntry.result_id == result.id)
        .order_by(DescriptorEntry.version.desc())
        .limit(1)
    )
    values = dict(entry.values) if entry is not None else {}
    her2 = s.scalar(
        select(PathologyResult.her2)
        .where(PathologyResult.result_id == result.id)
        .order_by(PathologyResult.reported_at.desc(), PathologyResult.id.desc())
        .limit(1)
    )
    hook_seen = (
        s.scalar(
            select(AuditEvent.id)
            .where(
                AuditEvent.result_id == result.id,
                AuditEvent.action == AuditAction.DISCORDANCE_DETECTED,
            )
            .limit(1)
        )
        is not None
    )
    facts = CaseFacts(
        viewed=result.first_viewed_at is not None,
        descriptors_entered=bool(values),
        descriptors_complete=descriptors_complete(values),
        roi_confirmed=bool(entry is not None and entry.roi_confirmed),
        decided=result.board_decision is not None,
        withdrawn=result.observation_override == ObservationStatus.ENTERED_IN_ERROR.value,
        pathology_known=her2 is not None,
    )
    result.lesion_type = values.get("lesion_type") or None
    result.state = CaseState.derive(facts).value
    result.discordant = hook_seen or is_discordant(
        above_threshold=bool(result.above_threshold),
        biopsy_her2_zero=her2 == Her2Pathology.ZERO.value,
    )
