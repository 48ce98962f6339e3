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

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.status import StoreStatus
from dicom_node.storage import FileStore, StorageFull, digest

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF


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
                with self.sessions() as session:
                    latest = session.scalars(
                        select(Instance)
                        .where(Instance.sop_instance_uid == sop_instance_uid)
                        .order_by(Instance.version.desc())
                        .limit(1)
                    ).first()
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
                    _touch_series(session, series_uid, study_uid, modality, new=latest is None)
                    if latest is not None:
                        latest.current = False
                    session.add(
                        Instance(
                            sop_instance_uid=sop_instance_uid,
                            version=version,
                            series_instance_uid=series_uid,
                            study_instance_uid=study_uid,
                            sop_class_uid=sop_class_uid,
                            transfer_syntax_uid=transfer_syntax_uid,
                            path=str(pending.path),
                            sha256=sha,
                            size=len(encoded),
                            calling_aet=calling_aet,
                        )
                    )
                    session.flush()
                    pending.wait()
                    session.commit()
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
    session: Session, series_uid: str, study_uid: str, modality: str, *, new: bool
) -> None:
    """Record the arrival: restart the quiet-period timer and re-open an analysed series."""
    now = time.time()
    series = session.get(Series, series_uid)
    if series is None:
        session.add(
            Series(
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                modality=modality,
                state=SeriesState.RECEIVING,
                generation=1,
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
            )
        )
        session.flush()
        return
    series.last_received_at = now
    if new:
        series.instance_count += 1
    if series.state is not SeriesState.RECEIVING:
        # A late or changed instance: a new generation will be analysed after the quiet period.
        series.generation += 1
        series.state = SeriesState.RECEIVING
        series.reason = ""
        session.execute(
            update(Job)
            .where(Job.series_instance_uid == series_uid, Job.state == JobState.QUEUED)
            .values(state=JobState.SUPERSEDED)
        )


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
