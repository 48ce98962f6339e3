"""Expected-count heuristics: early promotion only for series whose headers declare their size."""

from __future__ import annotations

import gzip
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.db import Job, JobState, Series, SeriesState
from dicom_node.jobs.scheduler import promote_complete, promote_stable
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.status import StoreStatus
from dicom_node.receiving.storage import FileStore
from dicom_node.series.completeness import (
    CompletenessTracker,
    CountSource,
    HeaderFacts,
    assess,
    facts_of,
)
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import load_settings
from tests import dicom_builders as b
from tests.conftest import RunningNode, start_node
from tests.node_data import encode

GRID = b.Grid(rows=4, cols=6, n_slices=3)


def _facts(
    positions: list[float], *, n: int | None = None, t: int | None = None
) -> list[HeaderFacts]:
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return [
        HeaderFacts(images_in_acquisition=n, temporal_positions=t, orientation=iop, position=p)
        for p in positions
    ]


# --------------------------------------------------------------------------- the rule


def test_declared_total_on_a_complete_grid_is_complete() -> None:
    verdict = assess(_facts([0, 4, 8] * 2, n=6))
    assert verdict.complete and verdict.expected == 6
    assert verdict.source is CountSource.IMAGES_IN_ACQUISITION


def test_temporal_positions_times_slices() -> None:
    verdict = assess(_facts([0, 4, 8] * 2, t=2))
    assert verdict.complete and verdict.source is CountSource.TEMPORAL_POSITIONS
    assert not assess(_facts([0, 4, 8] * 2, t=3)).complete


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        (_facts([0, 4, 8] * 2, n=9), "6 of 9"),
        (_facts([0, 4, 8] * 2), "no consistent declared count"),
        (_facts([0, 4, 8], n=3) + _facts([0, 4, 8], n=4), "no consistent declared count"),
        (_facts([0, 4, 12] * 2, n=6), "not evenly spaced"),
        (_facts([0, 4, 8, 0, 4, 4], n=6), "different numbers"),
        (_facts([0, 4, 8] * 2, n=4), "6 of 4"),
        ([HeaderFacts(images_in_acquisition=1, frames=40, position=0.0)], "multi-frame"),
        ([HeaderFacts(images_in_acquisition=1)], "positions"),
        ([], "no instances"),
    ],
)
def test_anything_less_than_a_declared_complete_grid_waits(
    facts: list[HeaderFacts], why: str
) -> None:
    verdict = assess(facts)
    assert not verdict.complete
    assert why in verdict.reason


def test_facts_of_a_malformed_header_are_none_not_errors() -> None:
    def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)

    ds = Dataset()  # as read from a file: values are converted on access
    for tag, vr, value in [
        (0x00201002, "IS", b"abc "),  # ImagesInAcquisition
        (0x00200105, "IS", b"-3"),  # NumberOfTemporalPositions
        (0x00200032, "DS", b"1\\x\\3 "),  # ImagePositionPatient
        (0x00200037, "DS", b"1\\0\\0\\0\\1 "),  # ImageOrientationPatient, 5 values
        (0x00280008, "BS", b"12"),  # NumberOfFrames with an impossible VR
    ]:
        ds._dict[BaseTag(tag)] = raw(tag, vr, value)
    facts = facts_of(ds)
    assert facts == HeaderFacts()


def test_vendor_exports(shared_dwi: Path, tmp_path: Path) -> None:
    """GE declares its 14 images; Siemens XA's temporal positions do not match; Philips says
    nothing usable: only GE is promoted early."""

    def files(name: str) -> list[str]:
        out = []
        for i, p in enumerate(sorted((shared_dwi / name / "dicom").iterdir())):
            data = p.read_bytes()
            if p.suffix == ".gz":
                data = gzip.decompress(data)
            target = tmp_path / name / f"{i}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            out.append(str(target))
        return out

    tracker = CompletenessTracker()
    ge = files("ge_signa_classic")
    assert tracker.assess(ge).complete
    assert not tracker.assess(ge[:-1]).complete
    assert not tracker.assess(files("siemens_xa30_classic_trace")).complete
    assert not tracker.assess(files("philips_ingenia_classic")).complete


# --------------------------------------------------------------------------- with the index


def _series(declared: int | None) -> list[Dataset]:
    vols = b.volumes(GRID, [(0.0, [None]), (800.0, [None])])
    series = b.classic_series(GRID, vols, manufacturer="GE MEDICAL SYSTEMS")
    for ds in series:
        if declared is not None:
            ds.ImagesInAcquisition = declared
    return series


@pytest.fixture
def ingestor(home: Path) -> Ingestor:
    settings = load_settings()
    return Ingestor(
        FileStore(settings.storage_dir), session_factory(make_engine(settings.node_database_url))
    )


def _store(ingestor: Ingestor, ds: Dataset) -> None:
    outcome = ingestor.ingest(
        encode(ds),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert outcome.status is StoreStatus.SUCCESS


def _state(ingestor: Ingestor, uid: str) -> Series:
    with ingestor.sessions() as session:
        series = session.get(Series, uid)
        assert series is not None
        return series


def test_complete_series_is_promoted_before_its_quiet_period(ingestor: Ingestor) -> None:
    series = _series(declared=6)
    uid = str(series[0].SeriesInstanceUID)
    tracker = CompletenessTracker()
    for ds in series[:-1]:
        _store(ingestor, ds)
        assert promote_complete(ingestor.sessions, tracker) == []
    _store(ingestor, series[-1])
    (job_id,) = promote_complete(ingestor.sessions, tracker)
    assert _state(ingestor, uid).state is SeriesState.QUEUED
    assert promote_complete(ingestor.sessions, tracker) == []  # once only
    assert promote_stable(ingestor.sessions, 3600.0) == []

    # a late instance (here: a changed version) re-opens the series for a new generation
    late = series[0].copy()
    late.PixelData = bytes(len(late.PixelData))
    _store(ingestor, late)
    reopened = _state(ingestor, uid)
    assert reopened.state is SeriesState.RECEIVING and reopened.generation == 2
    with ingestor.sessions() as session:
        assert session.get(Job, job_id).state is JobState.SUPERSEDED  # type: ignore[union-attr]


def test_series_without_a_declaration_waits_for_the_quiet_period(ingestor: Ingestor) -> None:
    series = _series(declared=None)
    for ds in series:
        _store(ingestor, ds)
    tracker = CompletenessTracker()
    assert promote_complete(ingestor.sessions, tracker) == []
    assert _state(ingestor, str(series[0].SeriesInstanceUID)).state is SeriesState.RECEIVING
    assert len(promote_stable(ingestor.sessions, 0.0, now=time.time() + 1)) == 1


def test_understated_declaration_is_fixed_by_the_late_instances(ingestor: Ingestor) -> None:
    """A vendor declaring one volume (3) for a two-volume series: promoted early after the
    first volume, re-opened by the second, and never promoted early again."""
    series = sorted(_series(declared=3), key=lambda ds: float(ds.DiffusionBValue))
    tracker = CompletenessTracker()
    for ds in series[:3]:
        _store(ingestor, ds)
    assert len(promote_complete(ingestor.sessions, tracker)) == 1
    for ds in series[3:]:
        _store(ingestor, ds)
    uid = str(series[0].SeriesInstanceUID)
    assert _state(ingestor, uid).generation == 2
    assert promote_complete(ingestor.sessions, tracker) == []
    assert _state(ingestor, uid).state is SeriesState.RECEIVING


@pytest.mark.integration
def test_running_node_promotes_early(node_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pynetdicom import AE

    node_env.setenv("HER2LOW_NODE_QUIET_SECONDS", "600")
    running: RunningNode = start_node(load_settings())
    try:
        series = _series(declared=6)
        ae = AE(ae_title="PEER")
        ae.add_requested_context(b.MR_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="HER2LOW")
        assert assoc.is_established
        try:
            for ds in series:
                copy = pydicom.dcmread(BytesIO(encode(ds)))
                assert int(assoc.send_c_store(copy).Status) == 0x0000
        finally:
            assoc.release()
        uid = str(series[0].SeriesInstanceUID)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with running.sessions()() as session:
                state = session.scalars(
                    select(Series.state).where(Series.series_instance_uid == uid)
                ).one()
            if state is not SeriesState.RECEIVING:
                break
            time.sleep(0.2)
        assert state is SeriesState.QUEUED  # long before the 600 s quiet period
    finally:
        running.stop.set()
        running.thread.join(timeout=10)
