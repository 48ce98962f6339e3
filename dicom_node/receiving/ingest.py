"""Accept one encoded instance: check it, store it durably, index it, (re)open its series.

The single place that decides what a C-STORE means for the node, separate from the network
code so that it can be tested and benchmarked without an association.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from typing import cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.receiving.checks import (
    EXTENDED_OFFSET_TABLE,
    PIXEL_DATA,
    UNDEFINED_LENGTH,
    PixelElement,
    TooLarge,
    encapsulated_problem,
    inflated_size_within,
    native_length_problem,
    pixel_element,
)
from dicom_node.receiving.status import StoreStatus
from dicom_node.receiving.storage import FileStore, StorageFull, digest, same_content
from dicom_node.series.headers import text

log = logging.getLogger(__name__)

#: Default of ``node_max_instance_bytes``: holds any breast MRI instance, multi-frame included.
DEFAULT_MAX_INSTANCE_BYTES = 1 << 30
#: Transfer syntax UID -> encapsulated? (pydicom's lookup costs more than the check itself)
_COMPRESSED: dict[str, bool] = {}
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
_INSTANCES = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_JOBS = cast(Table, Job.__table__)

# Built once: constructing SQL expressions cost more per C-STORE than executing them.
_LATEST_VERSION = (
    select(_INSTANCES.c.id, _INSTANCES.c.version, _INSTANCES.c.sha256, _INSTANCES.c.path)
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

    def __init__(
        self,
        store: FileStore,
        sessions: sessionmaker[Session],
        *,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        self.store = store
        #: Bound on the instance as received and once inflated (``node_max_instance_bytes``).
        self.max_instance_bytes = max_instance_bytes
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
        limit = self.max_instance_bytes
        if len(encoded) > limit:
            return IngestOutcome(
                StoreStatus.OUT_OF_RESOURCES,
                f"{len(encoded)} bytes exceed the {limit}-byte limit (node_max_instance_bytes)",
            )
        try:
            header, torn, pixels = _read_header(encoded, transfer_syntax_uid, limit)
            if not torn:
                problem = _mismatch(header, sop_class_uid, sop_instance_uid) or pixels
                study_uid = str(header.StudyInstanceUID) if not problem else ""
                series_uid = str(header.SeriesInstanceUID) if not problem else ""
                modality = text(header, "Modality")
        except TooLarge as exc:
            return IngestOutcome(StoreStatus.OUT_OF_RESOURCES, str(exc))
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
                    if latest is not None and (
                        latest.sha256 == sha or same_content(encoded, latest.path)
                    ):  # re-sent, perhaps in another transfer syntax: nothing new to analyse
                        return IngestOutcome(StoreStatus.SUCCESS, "duplicate", series_uid)
                    version = 1 if latest is None else latest.version + 1
                    pending = self.store.begin_write(
                        encoded,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_instance_uid,
                        version=version,
                        sha256=sha,
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


def _read_header(encoded: bytes, syntax_uid: str, limit: int) -> tuple[Dataset, str, str]:
    """The dataset up to Pixel Data, the tag of a torn element ('' if none) and why the Pixel
    Data contradicts the header ('' if it does not).

    A Deflated dataset (PS3.5 A.5) is first inflated into nothing, with a bound, so that a small
    C-STORE cannot make pydicom inflate gigabytes; raises :class:`TooLarge` past ``limit``.
    """
    stream = BytesIO(encoded)
    if _deflated(encoded, syntax_uid, stream):
        inflated_size_within(memoryview(encoded)[stream.tell() :], limit)
        stream.seek(0)
        dataset = dcmread(stream)  # Deflated is always native: the length is all to check
        raw = dataset.get_item(PIXEL_DATA)
        if raw is None:
            return dataset, _torn_element(dataset), ""
        value = raw.value if raw.value is not None else b""
        return dataset, _torn_element(dataset), native_length_problem(dataset, len(value))
    header = dcmread(stream, stop_before_pixels=True)
    torn = _torn_element(header)
    syntax = header.file_meta.get("TransferSyntaxUID")
    if torn or syntax is None:
        return header, torn, ""
    syntax = syntax if isinstance(syntax, UID) else UID(syntax)
    found = pixel_element(encoded, stream.tell(), syntax)
    if isinstance(found, str):
        return header, found, ""
    if found is None:
        return header, "", ""
    return header, "", _pixel_problem(encoded, found, header, syntax)


def _deflated(encoded: bytes, syntax_uid: str, stream: BytesIO) -> bool:
    """Whether the file meta names Deflated (the stream then stands after the file meta).

    Decided by the file meta, not only the caller's word (``recover`` reads files from disk);
    the meta is parsed only when its bytes mention the Deflated UID, to keep the common path fast.
    """
    if syntax_uid != DeflatedExplicitVRLittleEndian and encoded.find(_DEFLATED, 0, 4096) < 0:
        return False
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return True
    stream.seek(0)
    return False


def _pixel_problem(encoded: bytes, found: PixelElement, header: Dataset, syntax: UID) -> str:
    """Native Pixel Data must have the length the header implies; encapsulated Pixel Data must
    parse into an offset table and at least one fragment per frame (PS3.5 8.2, A.4)."""
    compressed = _COMPRESSED.get(syntax)
    if compressed is None:
        try:
            compressed = _COMPRESSED[syntax] = syntax.is_compressed
        except ValueError:  # a private transfer syntax: nothing known about its encoding
            return ""
    if not compressed:
        if found.length == UNDEFINED_LENGTH:
            return "native Pixel Data with undefined length"
        return native_length_problem(header, found.length)
    if found.length != UNDEFINED_LENGTH:
        return "encapsulated Pixel Data with a defined length"
    return encapsulated_problem(
        encoded,
        found.start,
        header,
        syntax,
        extended_table=EXTENDED_OFFSET_TABLE in header,
    )


def _mismatch(header: Dataset, sop_class_uid: str, sop_instance_uid: str) -> str:
    """Why the dataset does not match the request (PS3.4 B.2.3 'does not match SOP Class')."""
    if text(header, "SOPClassUID") != sop_class_uid:
        return "SOPClassUID differs from the presentation context"
    if text(header, "SOPInstanceUID") != sop_instance_uid:
        return "SOPInstanceUID differs from the request"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not text(header, keyword):
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
    orphan removed afterwards. A temporary file a live sibling process is still writing is left
    to it. Returns how many instances were recovered.
    """
    recovered = found = 0
    with ingestor.sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    for orphan in ingestor.store.orphans():
        with ingestor.store.claim_orphan(orphan) as data:
            if data is None:
                continue
            found += 1
            recovered += _recover_one(ingestor, data)
            orphan.unlink(missing_ok=True)  # a copy now lives under its final name, or it was torn
    for path in ingestor.store.files():
        if str(path) not in known:
            found += 1
            recovered += _recover_one(ingestor, path.read_bytes())
    if found:
        log.warning(
            "recovered files after an unclean stop",
            extra={"found": found, "recovered": recovered},
        )
    return recovered


def _recover_one(ingestor: Ingestor, data: bytes) -> int:
    """1 if ``data`` was a new instance now indexed, 0 if a duplicate or unreadable."""
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
        return 0
    return int(outcome.status is StoreStatus.SUCCESS and outcome.detail != "duplicate")
