"""Durable DICOM file store: an instance is acknowledged only once its bytes survive a crash.

Write to a temporary file in the target folder, ``fsync`` it and ``rename`` it into place (atomic
on POSIX), so a success status never points at a torn file. Syncing the folder as well makes the
rename itself durable against power loss but costs a second device flush (7 ms measured here);
by default the node instead recovers at start-up any fsynced temporary file whose rename was
lost (:meth:`FileStore.orphans`, ``Ingestor.recover``). ``dir_fsync=True`` buys the strict form.

Several node processes may share one store (``node_reuse_port``), and one may start while another
is writing. A writer therefore holds an exclusive ``flock`` on its temporary file from creation
until after the rename, and recovery claims a temporary file only when it can take that lock
(:meth:`FileStore.claim_orphan`): a starting process never takes a live sibling's file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from her2low.core.private_files import FILE_MODE, FOLDER_MODE, ensure_private_dir

_UID = re.compile(r"^[0-9.]{1,64}$")
_PIXEL_DATA = 0x7FE00010
_TRAILING_PADDING = 0xFFFCFFFC
_UNDEFINED = 0xFFFFFFFF


class StorageFull(OSError):
    """The store could not take the instance (no space, quota, read-only); answer 0xA700."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size: int


class PendingWrite:
    """A write whose device flush runs on a pool thread while the caller indexes it.

    :meth:`wait` returns once the bytes are fsynced and renamed into place (or raises
    :class:`StorageFull`); only then may the caller commit the index and answer success.
    """

    def __init__(self, stored: StoredFile, future: Future[None]) -> None:
        self.stored = stored
        self._future = future

    @property
    def path(self) -> Path:
        return self.stored.path

    def wait(self) -> StoredFile:
        self._future.result()
        return self.stored


def _safe_uid(uid: str) -> str:
    """UIDs become path components; anything but digits and dots is rejected (no traversal)."""
    if not _UID.match(uid):
        raise ValueError(f"not a DICOM UID: {uid[:70]!r}")
    return uid


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(data: bytes) -> str | None:
    """A digest of what an instance says, not of how it was encoded; ``None`` if unknown.

    Walks the dataset in tag order hashing each tag with its little-endian value bytes (the
    same in Implicit and Explicit VR, defined or undefined sequence lengths), without the file
    meta, group lengths and trailing padding; compressed Pixel Data is hashed decoded. So the
    same instance re-sent in another transfer syntax hashes alike, and a changed value does not.
    Only computed for a re-sent SOP Instance UID whose bytes differ, never per new instance.
    """
    try:
        dataset = dcmread(BytesIO(data))
        syntax = dataset.file_meta.TransferSyntaxUID
        if not syntax.is_little_endian:
            return None  # retired big endian: value bytes differ, leave it to the byte digest
        hasher = hashlib.sha256()
        _hash_dataset(dataset, hasher, top=True)
        if _PIXEL_DATA in dataset:
            hasher.update(b"pixels")
            hasher.update(_pixel_bytes(dataset, compressed=syntax.is_compressed))
        return hasher.hexdigest()
    except Exception:  # unreadable or undecodable: count it as different (a new version)
        return None


def _hash_dataset(dataset: Dataset, hasher: Any, *, top: bool = False) -> None:
    for tag in sorted(dataset.keys()):
        if tag.element == 0 or tag == _TRAILING_PADDING or (top and tag == _PIXEL_DATA):
            continue
        raw = dataset.get_item(tag)
        hasher.update(BaseTag(tag).to_bytes(4, "little"))
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED
            and raw.VR != "SQ"
            and isinstance(raw.value, bytes)
            and not (raw.VR is None and _is_sequence(dataset, tag))
        ):
            hasher.update(raw.value)
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                hasher.update(b"item")
                _hash_dataset(item, hasher)
            hasher.update(b"end")
        else:
            hasher.update(repr(element.value).encode())


def _is_sequence(dataset: Dataset, tag: int) -> bool:
    """An Implicit VR element of defined length may be a sequence (its VR from the dictionary)."""
    try:
        return dataset[tag].VR == "SQ"
    except Exception:
        return False


def _pixel_bytes(dataset: Dataset, *, compressed: bool) -> bytes:
    """Pixel values as native little-endian bytes: decoded when compressed, else without the
    pad byte, so a losslessly compressed copy of a native instance hashes alike."""
    if compressed:
        return bytes(dataset.pixel_array.tobytes())
    value = bytes(dataset.PixelData)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    bits = int(dataset.BitsAllocated)
    if bits % 8:
        return value
    return value[: rows * columns * frames * samples * bits // 8]


def same_content(data: bytes, stored: str | os.PathLike[str]) -> bool:
    """Whether ``data`` says the same as the file at ``stored`` (see :func:`content_digest`)."""
    try:
        old = Path(stored).read_bytes()
    except OSError:
        return False
    new_digest = content_digest(data)
    return new_digest is not None and new_digest == content_digest(old)


class FileStore:
    """Files laid out as ``root/<study>/<series>/<sop>[.v<n>].dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True, dir_fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.dir_fsync = dir_fsync
        ensure_private_dir(self.root)
        self._flusher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self._folders: set[Path] = set()  # series folders known to exist
        # Temporary names unique to this store object, so that its writes never open a file that
        # another process (same PID in another container, or a PID reused) left or is writing.
        self._writer = f"{os.getpid()}.{secrets.token_hex(4)}"

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> Path:
        name = _safe_uid(sop_uid) + (f".v{version}" if version > 1 else "") + ".dcm"
        return self.root / _safe_uid(study_uid) / _safe_uid(series_uid) / name

    def write(
        self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str, version: int = 1
    ) -> StoredFile:
        """Write ``data`` durably; raises :class:`StorageFull` when the disk refuses it."""
        return self.begin_write(
            data, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, version=version
        ).wait()

    def begin_write(
        self,
        data: bytes,
        *,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        version: int = 1,
        sha256: str | None = None,
    ) -> PendingWrite:
        """Write ``data`` to a temporary file now; flush and rename it on a pool thread.

        ``sha256``: the caller's :func:`digest` of ``data``, if it has one (the ingest path
        digests every instance to find re-sends; hashing 130 KB again costs 0.1 ms).
        """
        target = self.path_for(study_uid, series_uid, sop_uid, version)
        tmp = target.with_name(f".{target.name}.{self._writer}.{threading.get_ident():x}.tmp")
        try:
            if target.parent not in self._folders:
                # one level at a time: mkdir(parents=True) gives parents the default mode
                target.parent.parent.mkdir(mode=FOLDER_MODE, exist_ok=True)
                target.parent.mkdir(mode=FOLDER_MODE, exist_ok=True)
                self._folders.add(target.parent)
            fd = self._open_locked(tmp)
        except OSError as exc:
            raise StorageFull(exc.errno, f"cannot store instance: {exc.strerror}") from exc
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            os.close(fd)
            self._discard(tmp)
            raise StorageFull(exc.errno, f"cannot store instance: {exc.strerror}") from exc
        stored = StoredFile(path=target, sha256=sha256 or digest(data), size=len(data))
        return PendingWrite(stored, self._flusher.submit(self._finish, fd, tmp, target))

    @staticmethod
    def _open_locked(tmp: Path) -> int:
        """Create ``tmp`` and lock it; again if a sibling's recovery removed it before the lock
        (between create and lock the file is empty, which recovery reads as torn)."""
        while True:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink:
                    return fd
            except OSError:
                os.close(fd)
                raise
            os.close(fd)

    def _finish(self, fd: int, tmp: Path, target: Path) -> None:
        try:
            try:
                if self.fsync:
                    os.fsync(fd)
                os.replace(tmp, target)  # before close: the lock is held until the file is in place
            finally:
                os.close(fd)
            if self.dir_fsync:
                dir_fd = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            self._discard(tmp)
            raise StorageFull(exc.errno, f"cannot store instance: {exc.strerror}") from exc

    @staticmethod
    def _discard(tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

    def orphans(self) -> list[Path]:
        """Temporary files left by a crash between fsync and rename (or before fsync), and any
        a live writer holds now: :meth:`claim_orphan` tells them apart."""
        return sorted(self.root.glob("*/*/.*.tmp"))

    @contextlib.contextmanager
    def claim_orphan(self, tmp: Path) -> Iterator[bytes | None]:
        """The bytes of temporary file ``tmp``, locked against writers while the caller recovers
        and removes it; ``None`` when a live writer holds it or it was renamed into place."""
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None  # a live writer: it renames the file when its fsync ends
                return
            try:
                still_there = os.stat(tmp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_there = False
            if not still_there:
                yield None  # renamed into place between the listing and the lock
                return
            with os.fdopen(os.dup(fd), "rb") as file:
                data = file.read()
            yield data
        finally:
            os.close(fd)

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.dcm"))
