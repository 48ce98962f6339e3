"""Accept one encoded instance: check it, store it durably, index it, (re)open its series.

The single place that decides what a C-STORE means for the node, separate from the network
code so that it can be tested and benchmarked without an association.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from typing import cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.receiving.status import StoreStatus
from dicom_node.receiving.storage import FileStore, StorageFull, digest

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF
_INSTANCES = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_JOBS = cast(Table, Job.__table__)

# Built once: constructing SQL expressions cost more per C-STORE than executing them.
_LATEST_VERSION = (
    select(_INSTANCES.c.id, _INSTANCES.c.version, _INSTANCES.c.sha256)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
    .order_by(_INSTANCES.c.version.desc())
    .limit(1)
)
_RETIRE_VERSION = (
    update(_INSTANCES).where(_INSTANCES.c.id == bindparam("row_id")).values(current=False)
)
_ADD_INSTANCE = insert(_INSTANCES)
_SERIES_STATE = select(_SERIES.c.state).where(
    _SERIES.c.series_instance_uid == bindparam("series_uid")
)
_ADD_SERIES = insert(_SERIES)
_TOUCH_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("series_uid"))
    .values(
        last_received_at=bindparam("now"),
        instance_count=_SERIES.c.instance_count + bindparam("added"),
    )
)
_REOPEN_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("series_uid"))
    .values(
        last_received_at=bindparam("now"),
        instance_count=_SERIES.c.instance_count + bindparam("added"),
        generation=_SERIES.c.generation + 1,
        state=SeriesState.RECEIVING,
        reason="",
    )
)
_SUPERSEDE_JOBS = (
    update(_JOBS)
    .where(
        _JOBS.c.series_instance_uid == bindparam("series_uid"),
        _JOBS.c.state == JobState.QUEUED,
    )
    .values(state=JobState.SUPERSEDED)
)


@dataclass(frozen=True)
class IngestOutcome:
    status: StoreStatus
    #: "stored", "duplicate", "new-version" or the reason of a failure (no patient data).
    detail: str
    series_instance_uid: str = ""


class Ingestor:
    """Turns encoded instances into files and index rows; thread-safe for concurrent associations."""

    def __init__(self, store: FileStore, sessions: sessionmaker[Session]) -> None:
        self.store = store
        self.sessions = sessions
        self.engine: Engine = sessions.kw["bind"]
        # SQLite has one writer at a time; serialising here avoids busy retries under load.
        self._lock = threading.Lock()

    def ingest(
        self,
        encoded: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_aet: str = "",
    ) -> IngestOutcome:
        """Store one instance given as a DICOM file (preamble, file meta, dataset)."""
        stream = BytesIO(encoded)
        try:
            header = dcmread(stream, stop_before_pixels=True)
            torn = _torn_element(header) or _torn_pixel_data(encoded, stream.tell(), header)
            if not torn:
                problem = _mismatch(header, sop_class_uid, sop_instance_uid)
                study_uid = str(header.StudyInstanceUID) if not problem else ""
                series_uid = str(header.SeriesInstanceUID) if not problem else ""
                modality = str(header.get("Modality", "") or "")
        except Exception as exc:  # pydicom raises many types on corrupt input, also on access
            return IngestOutcome(StoreStatus.CANNOT_UNDERSTAND, f"unreadable: {type(exc).__name__}")
        if torn:
            return IngestOutcome(StoreStatus.CANNOT_UNDERSTAND, f"element {torn} runs past the end")
        if problem:
            return IngestOutcome(StoreStatus.DATASET_MISMATCH, problem)
        sha = digest(encoded)

        with self._lock:
            try:
                # Core statements on one connection: the index is on the C-STORE's critical
                # path, and ORM unit-of-work bookkeeping cost more than the SQL itself.
                with self.engine.begin() as conn:
                    latest = conn.execute(_LATEST_VERSION, {"sop_uid": sop_instance_uid}).first()
                    if latest is not None and latest.sha256 == sha:
                        return IngestOutcome(StoreStatus.SUCCESS, "duplicate", series_uid)
                    version = 1 if latest is None else latest.version + 1
                    pending = self.store.begin_write(
                        encoded,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_instance_uid,
                        version=version,
                    )
                    # Index while the device flushes; commit only once the bytes are durable.
                    _touch_series(conn, series_uid, study_uid, modality, new=latest is None)
                    if latest is not None:
                        conn.execute(_RETIRE_VERSION, {"row_id": latest.id})
                    conn.execute(
                        _ADD_INSTANCE,
                        {
                            "sop_instance_uid": sop_instance_uid,
                            "version": version,
                            "series_instance_uid": series_uid,
                            "study_instance_uid": study_uid,
                            "sop_class_uid": sop_class_uid,
                            "transfer_syntax_uid": transfer_syntax_uid,
                            "path": str(pending.path),
                            "sha256": sha,
                            "size": len(encoded),
                            "calling_aet": calling_aet,
                            "received_at": time.time(),
                            "current": True,
                        },
                    )
                    pending.wait()
            except StorageFull as exc:
                log.error("store refused", extra={"series_uid": series_uid, "errno": exc.errno})
                return IngestOutcome(StoreStatus.OUT_OF_RESOURCES, "storage full", series_uid)
            except ValueError as exc:
                return IngestOutcome(StoreStatus.DATASET_MISMATCH, str(exc), series_uid)
            except SQLAlchemyError as exc:
                log.error(
                    "index unavailable", extra={"series_uid": series_uid, "err": type(exc).__name__}
                )
                return IngestOutcome(StoreStatus.OUT_OF_RESOURCES, "index unavailable", series_uid)
        if version > 1:
            log.warning(
                "instance re-sent with different content; kept as a new version",
                extra={"sop_uid": sop_instance_uid, "series_uid": series_uid, "version": version},
            )
            return IngestOutcome(StoreStatus.SUCCESS, "new-version", series_uid)
        return IngestOutcome(StoreStatus.SUCCESS, "stored", series_uid)


def _torn_element(ds: Dataset) -> str:
    """The tag of an element whose declared length exceeds the bytes present (pydicom reads
    such values short without complaint), or ''."""
    for tag, raw in ds._dict.items():
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != UNDEFINED_LENGTH
            and len(raw.value) != raw.length
        ):
            return str(tag)
    return ""


def _torn_pixel_data(encoded: bytes, offset: int, header: Dataset) -> str:
    """The tag of the element the header read stopped at (Pixel Data) when its declared length
    runs past the end of ``encoded``, or ''. ``offset`` is where that element starts."""
    syntax = header.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax == DeflatedExplicitVRLittleEndian or offset >= len(encoded):
        return ""
    little = syntax != ExplicitVRBigEndian
    implicit = syntax == ImplicitVRLittleEndian
    end = "<" if little else ">"
    if offset + 8 > len(encoded):
        return "(7FE0,0010)"
    group, element = struct.unpack_from(f"{end}HH", encoded, offset)
    if implicit:
        (length,) = struct.unpack_from(f"{end}I", encoded, offset + 4)
        start = offset + 8
    else:
        if offset + 12 > len(encoded):
            return f"({group:04X},{element:04X})"
        (length,) = struct.unpack_from(f"{end}I", encoded, offset + 8)
        start = offset + 12
    if length != UNDEFINED_LENGTH and start + length > len(encoded):
        return f"({group:04X},{element:04X})"
    return ""


def _mismatch(header: Dataset, sop_class_uid: str, sop_instance_uid: str) -> str:
    """Why the dataset does not match the request (PS3.4 B.2.3 'does not match SOP Class')."""
    get = header.get
    if str(get("SOPClassUID", "") or "") != sop_class_uid:
        return "SOPClassUID differs from the presentation context"
    if str(get("SOPInstanceUID", "") or "") != sop_instance_uid:
        return "SOPInstanceUID differs from the request"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(get(keyword, "") or ""):
            return f"{keyword} missing"
    return ""


def _touch_series(
    conn: Connection, series_uid: str, study_uid: str, modality: str, *, new: bool
) -> None:
    """Record the arrival: restart the quiet-period timer and re-open an analysed series."""
    now = time.time()
    row = conn.execute(_SERIES_STATE, {"series_uid": series_uid}).first()
    if row is None:
        conn.execute(
            _ADD_SERIES,
            {
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "modality": modality,
                "state": SeriesState.RECEIVING,
                "generation": 1,
                "analysed_generation": 0,
                "instance_count": 1,
                "first_received_at": now,
                "last_received_at": now,
                "role": "",
                "reason": "",
                "result_id": "",
            },
        )
        return
    params = {"series_uid": series_uid, "now": now, "added": 1 if new else 0}
    if row.state is SeriesState.RECEIVING:
        conn.execute(_TOUCH_SERIES, params)
        return
    # A late or changed instance: a new generation will be analysed after the quiet period.
    conn.execute(_REOPEN_SERIES, params)
    conn.execute(_SUPERSEDE_JOBS, {"series_uid": series_uid})

def recover(ingestor: Ingestor) -> int:
    """Index what a crash left unindexed: orphaned temporary files and unindexed files.

    Each is fed back through :meth:`Ingestor.ingest` (which de-duplicates by content), and the
    orphan removed afterwards. Returns how many instances were recovered.
    """
    recovered = 0
    with ingestor.sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    candidates = ingestor.store.orphans() + [
        p for p in ingestor.store.files() if str(p) not in known
    ]
    for path in candidates:
        data = path.read_bytes()
        try:
            meta = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            outcome = ingestor.ingest(
                data,
                sop_class_uid=str(meta.file_meta.MediaStorageSOPClassUID),
                sop_instance_uid=str(meta.file_meta.MediaStorageSOPInstanceUID),
                transfer_syntax_uid=str(meta.file_meta.TransferSyntaxUID),
                calling_aet="recovered",
            )
        except Exception:
            outcome = IngestOutcome(StoreStatus.CANNOT_UNDERSTAND, "unreadable")
        if path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)  # a copy now lives under its final name, or it was torn
        if outcome.status is StoreStatus.SUCCESS and outcome.detail != "duplicate":
            recovered += 1
    if candidates:
        log.warning(
            "recovered files after an unclean stop",
            extra={"found": len(candidates), "recovered": recovered},
        )
    return recovered
