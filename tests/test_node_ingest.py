"""The node's store and index, without the network: durability, duplicates, versions, refusals."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select, update

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.jobs.scheduler import (
    MAX_ATTEMPTS,
    pending_jobs,
    promote_stable,
    run_forever,
    stale_jobs,
)
from dicom_node.receiving.ingest import Ingestor, IngestOutcome
from dicom_node.receiving.status import StoreStatus
from dicom_node.receiving.storage import FileStore, StorageFull
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import load_settings
from tests.node_data import encode, mr_dataset


@pytest.fixture
def ingestor(home: Path) -> Ingestor:
    settings = load_settings()
    return Ingestor(
        FileStore(settings.storage_dir), session_factory(make_engine(settings.node_database_url))
    )


def _ingest(
    ingestor: Ingestor, data: bytes, sop_class: str = MRImageStorage, sop: str | None = None
) -> IngestOutcome:
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    return ingestor.ingest(
        data,
        sop_class_uid=sop_class,
        sop_instance_uid=sop or str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def test_stored_instance_is_on_disk_and_indexed(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    outcome = _ingest(ingestor, encode(ds))
    assert outcome.status is StoreStatus.SUCCESS and outcome.detail == "stored"
    with ingestor.sessions() as s:
        row = s.scalars(select(Instance)).one()
        series = s.get(Series, ds.SeriesInstanceUID)
    assert Path(row.path).read_bytes() == encode(ds)
    assert (
        series is not None and series.state is SeriesState.RECEIVING and series.instance_count == 1
    )
    assert not any(p.name.endswith(".tmp") for p in Path(row.path).parent.iterdir())


def test_an_instance_is_hashed_once_on_its_way_in(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's digest is handed to the store, not computed again for the same bytes."""
    from dicom_node.receiving import ingest, storage

    hashed: list[int] = []

    def counting(data: bytes) -> str:
        hashed.append(len(data))
        return hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(ingest, "digest", counting)
    monkeypatch.setattr(storage, "digest", counting)
    data = encode(mr_dataset(generate_uid(), generate_uid()))
    assert _ingest(ingestor, data).detail == "stored"
    assert hashed == [len(data)]
    with ingestor.sessions() as s:
        assert s.scalars(select(Instance.sha256)).one() == hashlib.sha256(data).hexdigest()


def test_same_bytes_twice_is_success_without_new_work(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    _ingest(ingestor, encode(ds))
    with ingestor.sessions() as s:
        before = s.get(Series, ds.SeriesInstanceUID).last_received_at  # type: ignore[union-attr]
    outcome = _ingest(ingestor, encode(ds))
    assert outcome.status is StoreStatus.SUCCESS and outcome.detail == "duplicate"
    with ingestor.sessions() as s:
        assert s.query(Instance).count() == 1
        assert s.get(Series, ds.SeriesInstanceUID).last_received_at == before  # type: ignore[union-attr]


def test_same_uid_new_bytes_is_a_new_version_and_reopens_series(ingestor: Ingestor) -> None:
    study, series_uid, sop = generate_uid(), generate_uid(), generate_uid()
    _ingest(ingestor, encode(mr_dataset(study, series_uid, sop=sop, value=1)))
    sessions = ingestor.sessions
    promote_stable(sessions, 0.0, now=1e12)
    with sessions() as s:
        assert s.get(Series, series_uid).state is SeriesState.QUEUED  # type: ignore[union-attr]
    outcome = _ingest(ingestor, encode(mr_dataset(study, series_uid, sop=sop, value=2)))
    assert outcome.detail == "new-version"
    with sessions() as s:
        rows = s.scalars(select(Instance).order_by(Instance.version)).all()
        series = s.get(Series, series_uid)
        jobs = s.scalars(select(Job)).all()
    assert [(r.version, r.current) for r in rows] == [(1, False), (2, True)]
    assert series is not None and series.generation == 2 and series.state is SeriesState.RECEIVING
    assert [j.state for j in jobs] == [JobState.SUPERSEDED]


def test_dataset_not_matching_its_sop_class_is_a900(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    outcome = _ingest(ingestor, encode(ds), sop_class=CTImageStorage)
    assert outcome.status is StoreStatus.DATASET_MISMATCH


def test_dataset_without_series_uid_is_a900(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    del ds.SeriesInstanceUID
    assert _ingest(ingestor, encode(ds)).status is StoreStatus.DATASET_MISMATCH


def test_unreadable_bytes_are_c000_and_nothing_is_stored(ingestor: Ingestor) -> None:
    outcome = ingestor.ingest(
        b"\x00" * 10 + b"not dicom at all",
        sop_class_uid=MRImageStorage,
        sop_instance_uid=generate_uid(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert outcome.status is StoreStatus.CANNOT_UNDERSTAND
    with ingestor.sessions() as s:
        assert s.query(Instance).count() == 0


def test_uid_with_path_characters_is_refused(ingestor: Ingestor) -> None:
    ds = mr_dataset("1.2.3", "../../etc")
    assert _ingest(ingestor, encode(ds)).status is StoreStatus.DATASET_MISMATCH


def test_disk_refusal_is_a700(home: Path) -> None:
    settings = load_settings()
    blocker = home / "not-a-folder"
    blocker.write_text("a file where the store wants a folder")
    store = FileStore(home / "dicom")
    store.root = blocker  # every write now fails with an OSError, like a full or read-only disk
    ingestor = Ingestor(store, session_factory(make_engine(settings.node_database_url)))
    outcome = _ingest(ingestor, encode(mr_dataset(generate_uid(), generate_uid())))
    assert outcome.status is StoreStatus.OUT_OF_RESOURCES
    with ingestor.sessions() as s:
        assert s.query(Instance).count() == 0


def test_storage_full_is_raised_as_such(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (tmp_path / "1.2").write_text("blocks the study folder")
    with pytest.raises(StorageFull):
        store.write(b"x", study_uid="1.2", series_uid="3.4", sop_uid="5.6")


def _one_instance_series(ingestor: Ingestor) -> Series:
    """Ingest one instance of a new series; that series' index row (detached, as read)."""
    ds = mr_dataset(generate_uid(), generate_uid())
    _ingest(ingestor, encode(ds))
    with ingestor.sessions() as s:
        series = s.get(Series, ds.SeriesInstanceUID)
        assert series is not None
        return series


def test_stability_uses_database_timers(ingestor: Ingestor) -> None:
    last = _one_instance_series(ingestor).last_received_at
    sessions = ingestor.sessions
    assert promote_stable(sessions, 10.0, now=last + 5) == []
    jobs = promote_stable(sessions, 10.0, now=last + 11)
    assert len(jobs) == 1
    assert promote_stable(sessions, 10.0, now=last + 20) == []  # queued once only
    assert pending_jobs(sessions) == jobs


def test_quiet_period_counts_only_while_the_node_listens(ingestor: Ingestor) -> None:
    last = _one_instance_series(ingestor).last_received_at
    sessions = ingestor.sessions
    # the node crashed after this instance and came back 60 s later: the sender gets 10 s
    restarted = last + 60
    assert promote_stable(sessions, 10.0, now=restarted + 1, listening_since=restarted) == []
    assert promote_stable(sessions, 10.0, now=restarted + 9, listening_since=restarted) == []
    assert len(promote_stable(sessions, 10.0, now=restarted + 10, listening_since=restarted)) == 1


def test_housekeeping_after_a_restart_waits_a_quiet_period_before_promoting(
    ingestor: Ingestor,
) -> None:
    series_uid = _one_instance_series(ingestor).series_instance_uid
    sessions = ingestor.sessions
    with sessions() as s:  # the last instance came long before the node (re)started
        s.execute(
            update(Series)
            .where(Series.series_instance_uid == series_uid)
            .values(last_received_at=time.time() - 3600)
        )
        s.commit()
    queued: list[tuple[float, str]] = []
    stop = threading.Event()
    started = time.monotonic()
    loop = threading.Thread(
        target=run_forever,
        args=(sessions, lambda job: queued.append((time.monotonic() - started, job)), 2.0),
        kwargs={"stop": stop.is_set, "tick": 0.1, "early_promotion": False},
    )
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while not queued and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert len(queued) == 1, queued
    assert queued[0][0] >= 2.0  # not on the first tick: the sender had 2 s to resume


def test_dead_worker_lease_requeues_then_gives_up(ingestor: Ingestor) -> None:
    from dicom_node.jobs.runner import claim

    ds = mr_dataset(generate_uid(), generate_uid())
    _ingest(ingestor, encode(ds))
    sessions = ingestor.sessions
    (job_id,) = promote_stable(sessions, 0.0, now=1e12)
    for _ in range(MAX_ATTEMPTS - 1):
        assert claim(sessions, job_id) is not None  # a worker takes it and dies
        assert claim(sessions, job_id) is None  # nobody else may take a running job
        assert stale_jobs(sessions, now=1e13) == [job_id]
    assert claim(sessions, job_id) is not None  # the last attempt dies too
    assert stale_jobs(sessions, now=1e13) == []  # given up, not re-queued
    with sessions() as s:
        assert s.get(Job, job_id).state is JobState.FAILED  # type: ignore[union-attr]
        assert s.get(Series, ds.SeriesInstanceUID).state is SeriesState.FAILED  # type: ignore[union-attr]


def test_no_temporary_files_left_after_many_writes(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for i in range(20):
        store.write(os.urandom(100), study_uid="1.2", series_uid="3.4", sop_uid=f"5.{i}")
    names = [p.name for p in (tmp_path / "1.2" / "3.4").iterdir()]
    assert len(names) == 20 and not [n for n in names if n.startswith(".")]


def test_recovery_indexes_orphaned_and_unindexed_files(ingestor: Ingestor) -> None:
    from dicom_node.receiving.ingest import recover

    study, series_uid = generate_uid(), generate_uid()
    orphan_ds = mr_dataset(study, series_uid)
    lost_ds = mr_dataset(study, series_uid)
    folder = ingestor.store.root / study / series_uid
    folder.mkdir(parents=True)
    # fsynced but the rename was lost (power cut between fsync and rename)
    orphan = folder / f".{orphan_ds.SOPInstanceUID}.dcm.123.abc.tmp"
    orphan.write_bytes(encode(orphan_ds))
    # renamed but its index row was lost
    (folder / f"{lost_ds.SOPInstanceUID}.dcm").write_bytes(encode(lost_ds))
    torn = folder / ".torn.dcm.9.9.tmp"
    torn.write_bytes(encode(mr_dataset(study, series_uid))[:200])

    assert recover(ingestor) == 2
    with ingestor.sessions() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert uids == {orphan_ds.SOPInstanceUID, lost_ds.SOPInstanceUID}
    assert not orphan.exists() and not torn.exists()
    assert recover(ingestor) == 0  # idempotent


def test_recovery_leaves_alone_a_file_a_live_sibling_process_is_writing(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several node processes share one store: one starting (and recovering) while another is
    between writing an instance and renaming it must neither take nor remove that file."""
    from dicom_node.receiving import storage
    from dicom_node.receiving.ingest import recover

    flushing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync
    calls: list[int] = []

    def held_fsync(fd: int) -> None:  # the first flush waits: the writer is mid-write
        calls.append(fd)
        if len(calls) == 1:
            flushing.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", held_fsync)
    ds = mr_dataset(generate_uid(), generate_uid())
    outcomes: list[IngestOutcome] = []
    writer = threading.Thread(target=lambda: outcomes.append(_ingest(ingestor, encode(ds))))
    writer.start()
    try:
        assert flushing.wait(30)
        (in_flight,) = ingestor.store.orphans()
        sibling = Ingestor(FileStore(ingestor.store.root), ingestor.sessions)
        assert recover(sibling) == 0
        assert in_flight.exists()
    finally:
        release.set()
        writer.join(60)
    assert [(o.status, o.detail) for o in outcomes] == [(StoreStatus.SUCCESS, "stored")]
    with ingestor.sessions() as s:
        (row,) = s.scalars(select(Instance)).all()
    assert Path(row.path).read_bytes() == encode(ds) and not ingestor.store.orphans()


def test_a_write_whose_new_file_a_recovery_removed_before_the_lock_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between creating its temporary file and locking it, a writer's file is empty; a sibling's
    recovery may read it as torn and remove it. The writer must notice and write a new one."""
    from dicom_node.receiving import storage

    real_flock = fcntl.flock
    removed: list[str] = []

    def flock_after_a_recovery(fd: int, operation: int) -> None:
        if not removed:
            (tmp,) = tmp_path.glob("*/*/.*.tmp")
            tmp.unlink()  # what recover() does with an empty (torn) temporary file
            removed.append(tmp.name)
        real_flock(fd, operation)

    monkeypatch.setattr(storage.fcntl, "flock", flock_after_a_recovery)
    stored = FileStore(tmp_path).write(b"instance", study_uid="1.2", series_uid="3.4", sop_uid="5")
    assert removed and stored.path.read_bytes() == b"instance"
    assert not list(tmp_path.glob("*/*/.*.tmp"))


def test_a_claimed_orphan_is_read_once_its_writer_is_gone(tmp_path: Path) -> None:
    """The lock, not the file name, tells a live writer's file from a dead one's."""
    store = FileStore(tmp_path)
    folder = tmp_path / "1.2" / "3.4"
    folder.mkdir(parents=True)
    orphan = folder / ".5.6.dcm.1.abc.tmp"
    orphan.write_bytes(b"bytes a crashed writer fsynced")
    held = os.open(orphan, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a live writer (another open file description)
    with store.claim_orphan(orphan) as data:
        assert data is None
    os.close(held)  # the writer died: its lock went with it
    with store.claim_orphan(orphan) as data:
        assert data == b"bytes a crashed writer fsynced"
    with store.claim_orphan(folder / ".gone.dcm.1.abc.tmp") as data:
        assert data is None


def test_a_studys_seg_is_queued_before_its_images(ingestor: Ingestor) -> None:
    study = generate_uid()
    images = mr_dataset(study, generate_uid())
    seg = mr_dataset(study, generate_uid())
    seg.Modality = "SEG"
    _ingest(ingestor, encode(images))
    _ingest(ingestor, encode(seg))  # arrives last, goes quiet in the same tick
    jobs = promote_stable(ingestor.sessions, 0.0, now=1e12)
    with ingestor.sessions() as s:
        order = [s.get(Job, job_id).series_instance_uid for job_id in jobs]  # type: ignore[union-attr]
    assert order == [seg.SeriesInstanceUID, images.SeriesInstanceUID]


def test_reopened_series_is_due_at_once_with_a_new_generation(ingestor: Ingestor) -> None:
    from dicom_node.jobs.scheduler import reopen_series

    ds = mr_dataset(generate_uid(), generate_uid())
    _ingest(ingestor, encode(ds))
    sessions = ingestor.sessions
    with sessions() as s:
        series = s.get(Series, ds.SeriesInstanceUID)
        assert series is not None
        series.state = SeriesState.DONE  # analysed without a SEG
        s.commit()
    reopen_series(sessions, [ds.SeriesInstanceUID], quiet_seconds=30)
    (job_id,) = promote_stable(sessions, 30)  # due now: no second quiet period
    with sessions() as s:
        assert s.get(Job, job_id).generation == 2  # type: ignore[union-attr]


def test_series_the_fit_cannot_support_is_skipped_with_its_reason(
    ingestor: Ingestor, tmp_path: Path
) -> None:
    from dicom_node.jobs.pipeline import PipelineSettings, Skipped, run_pipeline
    from dicom_node.synth import write_study

    manifest = write_study(tmp_path / "s", seed=4, b_values=(0, 1000), matrix=(32, 64), slices=4)
    for name in manifest.dwi.files:
        data = (tmp_path / "s" / name).read_bytes()
        _ingest(ingestor, data)
    settings = PipelineSettings(
        results_url="http://127.0.0.1:9", results_token="t", quiet_seconds=1
    )
    with pytest.raises(Skipped, match="cannot be analysed: DKI needs at least 3 distinct b-values"):
        run_pipeline(ingestor.sessions, manifest.dwi.series_instance_uid, settings)


def test_service_outage_never_fails_a_job(ingestor: Ingestor, tmp_path: Path) -> None:
    from dicom_node.jobs.pipeline import PipelineSettings
    from dicom_node.jobs.runner import RetryLater, run_job
    from dicom_node.synth import write_study
    from tests.conftest import free_port

    manifest = write_study(tmp_path / "s", seed=6, matrix=(32, 64), slices=4)
    for name in manifest.dwi.files:
        _ingest(ingestor, (tmp_path / "s" / name).read_bytes())
    sessions = ingestor.sessions
    (job_id,) = promote_stable(sessions, 0.0, now=1e12)
    down = PipelineSettings(  # nothing listens there: the CDS service is down
        results_url=f"http://127.0.0.1:{free_port()}", results_token="t", quiet_seconds=1
    )
    for _ in range(MAX_ATTEMPTS + 3):
        with pytest.raises(RetryLater):
            run_job(sessions, down, job_id)
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
        assert "unreachable" in job.error
    assert stale_jobs(sessions, now=1e13) == [job_id]  # re-sent by the scheduler, not given up
