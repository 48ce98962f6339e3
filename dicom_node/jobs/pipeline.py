"""From stored instances to a published result for one series.

read files → classify the series → assemble the DWI volume → find the tumour SEG →
:func:`dicom_node.analysis.series_analysis.analyse` (fit, ROI, features) → publish to the results API.
Series that are not analysable are *skipped with a reason*, never dropped silently.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analysis.companions import CompanionSeries, companion_from_datasets
from dicom_node.analysis.outputs.identification import is_own_object
from dicom_node.analysis.series_analysis import (
    Analysis,
    AnalysisError,
    AnalysisSettings,
    analyse,
)
from dicom_node.db import Instance, Series, SeriesState
from dicom_node.jobs.export import ExportConfig, export_results
from dicom_node.jobs.publish import publish
from dicom_node.jobs.scheduler import reopen_series
from dicom_node.series.assemble import AssemblyError, assemble_dwi, check_headers
from dicom_node.series.headers import first_text, scanner_info, text
from dicom_node.series.roles import SeriesRole, classify_series
from models.contract import API_VERSION, PatientKey, ResultPayload

_FIT_INPUT_ROLES = {role.value for role in SeriesRole if role.is_fit_input}
_BUSY = (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.ANALYSING)


class Skipped(Exception):
    """The series is recorded but not analysed; ``reason`` says why (no patient data)."""

    def __init__(self, reason: str, role: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.role = role


class Deferred(Exception):
    """Try again later (e.g. the study's SEG is still arriving)."""


@dataclass(frozen=True)
class PipelineSettings:
    results_url: str
    results_token: str
    quiet_seconds: float
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    #: Result objects (SR, SEG, maps) to DICOM destinations; ``None`` = none configured.
    export: ExportConfig | None = None


@dataclass(frozen=True)
class PipelineOutcome:
    result_id: str
    publish_status: str
    role: str


def _current_paths(session: Session, series_uid: str) -> list[str]:
    return list(
        session.scalars(
            select(Instance.path).where(
                Instance.series_instance_uid == series_uid, Instance.current.is_(True)
            )
        )
    )


def _read(paths: list[str]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(paths)]


def _acquired_at(ds: Dataset) -> dt.datetime:
    """AcquisitionDateTime, else Series/Study date and time (naive: read as UTC); else now."""
    raw = text(ds, "AcquisitionDateTime")
    if not raw:
        date = first_text(ds, "SeriesDate", "StudyDate")
        time_ = first_text(ds, "SeriesTime", "StudyTime", default="000000")
        raw = date + time_ if date else ""
    if len(raw) < 8:
        return dt.datetime.now(dt.UTC).replace(microsecond=0)
    digits = raw.split(".")[0].ljust(14, "0")[:14]
    return dt.datetime.strptime(digits, "%Y%m%d%H%M%S")


def _study_date(ds: Dataset) -> dt.date | None:
    """StudyDate (DA, ``YYYYMMDD``) as a date; None when absent or malformed."""
    raw = text(ds, "StudyDate")
    try:
        return dt.datetime.strptime(raw[:8], "%Y%m%d").date() if len(raw) >= 8 else None
    except ValueError:
        return None


def build_payload(first: Dataset, analysis: Analysis, series_uid: str) -> ResultPayload:
    """The results-API body (docs/results-api.md) for one analysed series, checked on build."""
    return ResultPayload(
        api_version=API_VERSION,
        pipeline_version=analysis.pipeline_version,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=series_uid,
        accession_number=text(first, "AccessionNumber"),
        patient=PatientKey(
            id=text(first, "PatientID"),
            issuer=text(first, "IssuerOfPatientID"),
            name=text(first, "PatientName")[:324] or None,
        ),
        acquired_at=_acquired_at(first),
        study_date=_study_date(first),
        laterality=analysis.laterality,
        features=dict(analysis.features),
        # make, model and field strength of the scanner (no serial number, station or site)
        provenance=analysis.provenance.model_copy(update={"scanner": scanner_info(first)}),
        # map slices and histograms for the review page (PNG, base64)
        previews={
            name.removesuffix(".png"): base64.b64encode(png).decode("ascii")
            for name, png in analysis.previews.items()
        },
    )


def _study_series(session: Session, study_uid: str) -> list[Series]:
    return list(session.scalars(select(Series).where(Series.study_instance_uid == study_uid)))


#: Roles whose series the automatic ROI may use ("" = not classified yet: read and classify).
_COMPANION_ROLES = {SeriesRole.T2W.value, SeriesRole.DCE.value, ""}


def _companions(
    sessions: sessionmaker[Session], siblings: list[Series], series_uid: str
) -> tuple[list[CompanionSeries], list[str]]:
    """T2w and DCE series of the study as companions of the automatic ROI, and the ones that
    could not be read (each with why); stored subtraction series first."""
    found: list[tuple[int, CompanionSeries]] = []
    left_out: list[str] = []
    with sessions() as session:
        for sib in siblings:
            if (
                sib.series_instance_uid == series_uid
                or sib.modality != "MR"
                or sib.role not in _COMPANION_ROLES
            ):
                continue
            if sib.state is SeriesState.RECEIVING:
                left_out.append(f"{sib.series_instance_uid}: still arriving")
                continue
            datasets = _read(_current_paths(session, sib.series_instance_uid))
            if not datasets or is_own_object(datasets[0]):
                continue
            role = classify_series(datasets).role.value
            if role not in _COMPANION_ROLES - {""}:
                continue
            try:
                comp = companion_from_datasets(role, datasets)
            except (ValueError, AttributeError) as exc:
                left_out.append(f"{role} {sib.series_instance_uid}: {exc}")
                continue
            found.append((0 if comp.stored_subtraction else 1, comp))
    return [c for _, c in sorted(found, key=lambda item: item[0])], left_out


def run_pipeline(
    sessions: sessionmaker[Session], series_uid: str, settings: PipelineSettings
) -> PipelineOutcome:
    with sessions() as session:
        series = session.get(Series, series_uid)
        if series is None:
            raise Skipped("series no longer indexed")
        paths = _current_paths(session, series_uid)
        siblings = _study_series(session, series.study_instance_uid)
    if not paths:
        raise Skipped("series has no instances")
    if is_own_object(pydicom.dcmread(sorted(paths)[0], stop_before_pixels=True)):
        # Our own SR/SEG/map routed back by a PACS: recognised by equipment identity.
        raise Skipped("a result object this node produced: not analysed", role="own_result")

    if series.modality == "SEG":
        # A ROI arrived: diffusion series of the study analysed without it are re-opened.
        targets = [
            s.series_instance_uid
            for s in siblings
            if s.role in _FIT_INPUT_ROLES and s.series_instance_uid != series_uid
        ]
        reopen_series(sessions, targets, settings.quiet_seconds)
        raise Skipped("segmentation stored; diffusion series of the study re-opened", role="seg")

    if any(s.modality == "SEG" and s.state in _BUSY for s in siblings):
        # Checked before any file is read: the retry is cheap while the SEG finishes arriving.
        raise Deferred("a segmentation of this study is still arriving")
    datasets = _read(paths)
    try:
        check_headers(datasets)
    except AssemblyError as exc:
        raise Skipped(f"unreadable headers: {exc}") from exc
    verdict = classify_series(datasets)
    role = verdict.role.value
    if not verdict.role.is_fit_input:
        raise Skipped(f"not a diffusion series ({role}): " + "; ".join(verdict.reasons), role=role)
    if not verdict.is_breast:
        raise Skipped("not a breast series: " + "; ".join(verdict.reasons), role=role)

    try:
        dwi = assemble_dwi(datasets)
    except AssemblyError as exc:
        raise Skipped(f"unusable diffusion series: {exc}", role=role) from exc

    segs: list[Dataset] = []
    with sessions() as session:
        for sib in siblings:
            if sib.modality == "SEG":
                segs.extend(
                    ds
                    for ds in _read(_current_paths(session, sib.series_instance_uid))
                    if not is_own_object(ds)
                )
    # No SEG: the automatic candidate uses the study's T2w and DCE series (read only then).
    companions, left_out = ([], []) if segs else _companions(sessions, siblings, series_uid)
    try:
        analysis = analyse(
            dwi,
            segs=segs,
            settings=settings.analysis,
            companions=companions,
            companions_ignored=left_out,
        )
    except AnalysisError as exc:  # the data cannot support the fit (e.g. too few b-values)
        raise Skipped(f"cannot be analysed: {exc}", role=role) from exc
    payload = build_payload(datasets[0], analysis, series_uid)
    published = publish(settings.results_url, settings.results_token, payload)
    export_results(
        sessions, settings.export, analysis=analysis, dwi=dwi, datasets=datasets, segs=segs
    )
    return PipelineOutcome(
        result_id=published.result_id, publish_status=published.status, role=role
    )
