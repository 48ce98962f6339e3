"""Reading DICOM files from disk: plain or gzip-wrapped, one file or whole folders.

Files arrive as DICOM Part 10 streams (PS3.10 §7: 128-byte preamble, ``DICM``, File Meta
Information). Test corpora and some archives wrap each file in gzip (RFC 1952); the wrapper is
recognised by its magic bytes, never by the file name. Folder walks are deterministic (sorted) so
that reports are reproducible, and the robust reader turns an unreadable file into a recorded
problem instead of an exception, so one bad file never hides a good series.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# Registers the UIH private dictionary, so Implicit VR UIH exports decode (docs/vendors.md).
import dicom_node.series.vendors  # noqa: F401

__all__ = [
    "DicomReadError",
    "ReadProblem",
    "ReadResult",
    "is_gzip",
    "iter_files",
    "read_dataset",
    "read_datasets",
]

_GZIP_MAGIC = b"\x1f\x8b"
#: Refuse to inflate a gzip member beyond this size (a guard against decompression bombs).
MAX_INFLATED_BYTES = 2 * 1024**3


class DicomReadError(Exception):
    """A file could not be read as DICOM (not Part 10, truncated, bad gzip wrapper, …)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ReadProblem:
    """A file that was skipped, with the reason (reported, never silently dropped)."""

    path: Path
    reason: str


@dataclass
class ReadResult:
    """Datasets read from a set of paths, plus the files that could not be read."""

    datasets: list[Dataset] = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)


def is_gzip(path: Path) -> bool:
    """True when ``path`` starts with the gzip magic bytes (RFC 1952 §2.3.1)."""
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _inflate(path: Path) -> bytes:
    with gzip.open(path, "rb") as fh:
        data = fh.read(MAX_INFLATED_BYTES + 1)
    if len(data) > MAX_INFLATED_BYTES:
        raise DicomReadError(path, "gzip member inflates beyond the size limit")
    return data


def read_dataset(path: Path | str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM Part 10 file, transparently unwrapping gzip.

    The returned dataset's ``filename`` is the path on disk (also for gzip-wrapped files) so
    later problems can name the file. Raises :class:`DicomReadError` for anything that is not a
    readable Part 10 file.
    """
    p = Path(path)
    try:
        if is_gzip(p):
            source: io.BytesIO | Path = io.BytesIO(_inflate(p))
        else:
            source = p
        ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
    except DicomReadError:
        raise
    except InvalidDicomError as exc:
        raise DicomReadError(p, "not a DICOM Part 10 file (no 'DICM' prefix)") from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DicomReadError(p, f"not a readable DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises assorted errors on truncated/corrupt data
        raise DicomReadError(p, f"corrupt DICOM data ({type(exc).__name__}: {exc})") from exc
    if "SOPInstanceUID" not in ds and "SOPClassUID" not in ds:
        # SOP Common module attributes are Type 1 (PS3.3 C.12.1): nothing usable was read.
        raise DicomReadError(p, "no SOP Class/Instance UID (empty or truncated file)")
    ds.filename = str(p)
    return ds


def iter_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Yield every regular file named by ``paths``, descending into folders (sorted order).

    Hidden files and folders (names starting with ``.``) inside a walked folder are skipped;
    a path given explicitly is always yielded if it is a file.
    """
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif p.is_file():
            yield p


def read_datasets(paths: Sequence[Path | str], *, stop_before_pixels: bool = False) -> ReadResult:
    """Read all files under ``paths``; unreadable files become :class:`ReadProblem` entries."""
    result = ReadResult()
    for raw in paths:
        if not Path(raw).exists():
            result.problems.append(ReadProblem(Path(raw), "path does not exist"))
    for path in iter_files(paths):
        try:
            result.datasets.append(read_dataset(path, stop_before_pixels=stop_before_pixels))
        except DicomReadError as exc:
            result.problems.append(ReadProblem(path, exc.reason))
    return result
