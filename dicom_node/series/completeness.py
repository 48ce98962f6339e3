"""Expected-count heuristics: recognise from its headers that a series has fully arrived.

A series is promoted before its quiet period only when the headers *declare* how many images
it has and what arrived forms exactly that complete, regular grid:

- a declared total: Images in Acquisition (0020,1002), the same on every instance (GE, Siemens
  and Philips classic images), or Number of Temporal Positions (0020,0105) × slice positions;
- the instances equal that total; every slice position (along the normal of one Image
  Orientation (Patient) (0020,0037)) holds the same number of images, one per b-value or
  temporal position; the positions are evenly spaced (no gap);
- classic single-frame images only (an enhanced multi-frame object declares its own frames).

Anything else — no declaration, mixed values, a gap, an unreadable header — waits for the
quiet period, so a wrong guess costs at most a re-analysis: a late instance re-opens the series
(:mod:`dicom_node.receiving.ingest`). Header facts are cached per stored file (PS3.3 C.7.6.1, C.7.6.2).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.series.headers import floats
from dicom_node.series.layout import cluster_values

_TAGS = [
    "ImagesInAcquisition",
    "NumberOfTemporalPositions",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]
POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.05  # relative


class CountSource(StrEnum):
    """Where the expected number of instances came from."""

    IMAGES_IN_ACQUISITION = "ImagesInAcquisition"
    TEMPORAL_POSITIONS = "NumberOfTemporalPositions"


@dataclass(frozen=True)
class HeaderFacts:
    """What one stored instance tells about the size of its series."""

    images_in_acquisition: int | None = None
    temporal_positions: int | None = None
    frames: int = 1
    orientation: tuple[float, ...] | None = None
    position: float | None = None  # along the slice normal, mm


@dataclass(frozen=True)
class Completeness:
    complete: bool
    reason: str
    expected: int | None = None
    source: CountSource | None = None


def _positive_int(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def facts_of(ds: Any) -> HeaderFacts:
    """Facts from a dataset; missing or malformed values become ``None`` (never raises)."""

    def get(keyword: str) -> Any:
        try:
            return ds.get(keyword)
        except Exception:  # lazily converted values of a malformed header
            return None

    iop = floats(get("ImageOrientationPatient"), 6)
    ipp = floats(get("ImagePositionPatient"), 3)
    position = None
    if iop is not None and ipp is not None:
        row, col = iop[:3], iop[3:]
        normal = (
            row[1] * col[2] - row[2] * col[1],
            row[2] * col[0] - row[0] * col[2],
            row[0] * col[1] - row[1] * col[0],
        )
        position = sum(p * n for p, n in zip(ipp, normal, strict=True))
    return HeaderFacts(
        images_in_acquisition=_positive_int(get("ImagesInAcquisition")),
        temporal_positions=_positive_int(get("NumberOfTemporalPositions")),
        frames=_positive_int(get("NumberOfFrames")) or 1,
        orientation=None if iop is None else tuple(round(v, 3) for v in iop),
        position=position,
    )


def read_facts(path: Path) -> HeaderFacts | None:
    """Facts of a stored file, or ``None`` when it cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except Exception:
        return None
    return facts_of(ds)


def declared_total(first: HeaderFacts) -> tuple[int, CountSource] | None:
    """The total one instance declares, if it can be computed without the others."""
    if first.images_in_acquisition is not None:
        return first.images_in_acquisition, CountSource.IMAGES_IN_ACQUISITION
    return None


def _slice_positions(values: Sequence[float]) -> list[tuple[float, int]]:
    """Distinct positions (clustered within the tolerance) with how many images each holds."""
    clusters = cluster_values(values, POSITION_TOLERANCE_MM)
    return [(sum(c) / len(c), len(c)) for c in clusters]


def _evenly_spaced(positions: Sequence[float]) -> bool:
    if len(positions) < 2:
        return True
    gaps = [b - a for a, b in itertools.pairwise(positions)]
    typical = sorted(gaps)[len(gaps) // 2]
    return typical > 0 and all(
        abs(g - typical) <= SPACING_TOLERANCE * typical + POSITION_TOLERANCE_MM for g in gaps
    )


def assess(facts: Sequence[HeaderFacts]) -> Completeness:
    """Whether these instances are, by their own declaration, the whole series."""
    if not facts:
        return Completeness(False, "no instances")
    if any(f.frames != 1 for f in facts):
        return Completeness(False, "multi-frame instances")
    if any(f.position is None for f in facts) or len({f.orientation for f in facts}) != 1:
        return Completeness(False, "positions or orientations missing or mixed")
    per_position = _slice_positions([f.position for f in facts if f.position is not None])
    counts = Counter(n for _, n in per_position)
    if len(counts) != 1:
        return Completeness(False, "slice positions hold different numbers of images")
    if not _evenly_spaced([p for p, _ in per_position]):
        return Completeness(False, "slice positions are not evenly spaced")

    images = {f.images_in_acquisition for f in facts}
    temporal = {f.temporal_positions for f in facts}
    if len(images) == 1 and None not in images:
        expected, source = images.pop(), CountSource.IMAGES_IN_ACQUISITION
    elif len(temporal) == 1 and None not in temporal:
        expected = temporal.pop() * len(per_position)  # type: ignore[operator]
        source = CountSource.TEMPORAL_POSITIONS
    else:
        return Completeness(False, "no consistent declared count")
    assert expected is not None
    if expected != len(facts):
        return Completeness(False, f"{len(facts)} of {expected} declared", expected, source)
    return Completeness(True, f"{expected} declared by {source.value}", expected, source)


class CompletenessTracker:
    """Assesses receiving series from their stored files, reading each header once."""

    def __init__(self) -> None:
        self._facts: dict[str, HeaderFacts | None] = {}

    def assess(self, paths: Sequence[str]) -> Completeness:
        if not paths:
            return Completeness(False, "no instances")
        first = self._read(paths[0])
        if first is None:
            return Completeness(False, "unreadable header")
        declared = declared_total(first)
        if declared is not None and declared[0] != len(paths):
            expected, source = declared
            return Completeness(False, f"{len(paths)} of {expected} declared", expected, source)
        if declared is None and first.temporal_positions is None:
            return Completeness(False, "no declared count")
        facts = [self._read(p) for p in paths]
        if any(f is None for f in facts):
            return Completeness(False, "unreadable header")
        return assess([f for f in facts if f is not None])

    def forget_all_but(self, paths: Iterable[str]) -> None:
        """Drop cached facts of files no longer of interest (series promoted or gone)."""
        keep = set(paths)
        for path in [p for p in self._facts if p not in keep]:
            del self._facts[path]

    def _read(self, path: str) -> HeaderFacts | None:
        if path not in self._facts:
            self._facts[path] = read_facts(Path(path))
        return self._facts[path]
