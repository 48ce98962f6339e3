"""The layout of one diffusion series from its headers alone: slices, volumes and problems.

:func:`plan_layout` orders the :class:`~dicom_node.series.frames.FrameRef` records of a series
by geometry (ImagePositionPatient · normal, PS3.3 C.7.6.2.1.1, never InstanceNumber), groups
frames into volumes by b-value shell (:func:`~dicom_node.series.bvalues.group_bvalues`),
direction and vendor volume identity, and reports every reason the series cannot be used as a
:class:`Problem`. No pixel data is read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    B0_THRESHOLD,
    GROUP_REL_TOL,
    DirectionalityValues,
    group_bvalues,
)
from dicom_node.series.csa import csa_image_header
from dicom_node.series.frames import (
    FrameRef,
    StorageStyle,
    Vec3,
    describe_gaps,
    expand_frames,
    image_matrix,
    is_siemens_mosaic,
    placement_gaps,
    storage_style,
    tile_grid,
)

__all__ = [
    "Layout",
    "Problem",
    "ProblemKind",
    "VolumePlan",
    "cluster_values",
    "direction_key",
    "plan_layout",
]

#: Slice positions closer than this (mm) along the normal are the same slice.
POSITION_TOL_MM = 0.05
#: Frames at one slice position whose in-plane origins differ by more than this belong to
#: different (overlapping) stacks.
INPLANE_TOL_MM = 0.5
#: ImageOrientationPatient cosines that differ by more than this are different orientations.
ORIENTATION_TOL = 1e-3
#: Relative deviation of slice gaps from their median that counts as irregular spacing.
SPACING_REL_TOL = 0.1


class ProblemKind(Enum):
    """Why a series cannot be assembled (or what is odd about it)."""

    NO_IMAGES = "no images"
    MIXED_SERIES = "several series"
    MISSING_B_VALUES = "missing b-values"
    INCONSISTENT_GEOMETRY = "inconsistent geometry"
    SEVERAL_STACKS = "several stacks"
    MISSING_SLICES = "missing slices"
    UNSUPPORTED_PIXELS = "unsupported pixel data"
    UNREADABLE_HEADER = "unreadable header"


@dataclass(frozen=True)
class Problem:
    """One reason a series is unusable, with a message naming what was found."""

    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


@dataclass
class VolumePlan:
    """One acquired 3-D volume: a frame index per slice, lowest slice first."""

    b: float | None
    direction: Vec3 | None
    directionality: DirectionalityValues | None
    frames: list[int]
    order: tuple[float, ...]


@dataclass
class Layout:
    """The header-only analysis of a series (no pixel data needed)."""

    storage: StorageStyle
    frames: list[FrameRef]
    slice_positions: list[float] = field(default_factory=list)
    volumes: list[VolumePlan] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Frames with no b-value in any known convention.
    frames_without_b: int = 0

    @property
    def rows(self) -> int:
        return self.frames[0].rows if self.frames else 0

    @property
    def columns(self) -> int:
        return self.frames[0].columns if self.frames else 0


def cluster_values(values: Sequence[float], tol: float) -> list[list[float]]:
    """1-D clusters of ``values`` (sorted), a value within ``tol`` of the previous one joining it.

    Slice positions along the normal: here for the layout, in :mod:`.completeness` for the
    early-promotion check.
    """
    clusters: list[list[float]] = []
    for value in sorted(values):
        if clusters and value - clusters[-1][-1] <= tol:
            clusters[-1].append(value)
        else:
            clusters.append([value])
    return clusters


def direction_key(d: Vec3 | None) -> tuple[float, ...] | None:
    return None if d is None else tuple(round(x, 3) + 0.0 for x in d)


def _b_key(b: float | None, shells: dict[float, int]) -> int | None:
    return None if b is None else shells[b]


def plan_layout(
    datasets: Sequence[Dataset],
    *,
    b0_threshold: float = B0_THRESHOLD,
    rel_tol: float = GROUP_REL_TOL,
) -> Layout:
    """Analyse slice geometry and volume structure of one series from its headers."""
    styles = {storage_style(ds) for ds in datasets}
    storage = (
        StorageStyle.ENHANCED
        if StorageStyle.ENHANCED in styles
        else StorageStyle.MOSAIC
        if StorageStyle.MOSAIC in styles
        else StorageStyle.CLASSIC
    )
    frames = expand_frames(datasets)
    layout = Layout(storage=storage, frames=frames)
    _check_mosaics(datasets, layout)
    _check_placed(datasets, layout)
    if not frames:
        layout.problems.append(
            Problem(
                ProblemKind.NO_IMAGES,
                "no image with position and "
                "orientation (ImagePositionPatient/ImageOrientation"
                "Patient) was found",
            )
        )
        return layout
    layout.frames_without_b = sum(1 for f in frames if f.diffusion.b is None)
    if not _check_geometry(layout):
        return layout
    iop = np.asarray(frames[0].orientation)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    dist = [float(np.dot(f.position, normal)) for f in frames]
    layout.slice_positions = [float(np.mean(c)) for c in cluster_values(dist, POSITION_TOL_MM)]
    gaps = np.abs(np.asarray(dist)[:, None] - np.asarray(layout.slice_positions)[None, :])
    slice_of = [int(k) for k in np.argmin(gaps, axis=1)]
    _check_stacks(layout, normal, slice_of)
    _check_spacing(layout)
    _plan_volumes(layout, slice_of, b0_threshold=b0_threshold, rel_tol=rel_tol)
    return layout


def _check_placed(datasets: Sequence[Dataset], layout: Layout) -> None:
    """Images without a usable position/orientation are reported, naming the missing tag."""
    placed: dict[int, int] = defaultdict(int)
    for f in layout.frames:
        placed[f.dataset_index] += 1
    unplaced = 0
    total = 0
    gaps: Counter[str] = Counter()
    for i, ds in enumerate(datasets):
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        expected = len(per_frame) if per_frame is not None else 1
        total += expected
        missing = max(expected - placed[i], 0)
        unplaced += missing
        if missing:
            gaps.update(placement_gaps(ds)[1])
    if unplaced:
        detail = describe_gaps(gaps, total)
        layout.problems.append(
            Problem(
                ProblemKind.INCONSISTENT_GEOMETRY,
                f"{unplaced} image(s) cannot be placed: "
                + (detail or "ImagePositionPatient/ImageOrientationPatient unusable"),
            )
        )


def _check_mosaics(datasets: Sequence[Dataset], layout: Layout) -> None:
    for ds in datasets:
        csa = csa_image_header(ds)
        grid = tile_grid(ds, csa)
        if grid is None and is_siemens_mosaic(ds):
            layout.problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED_PIXELS,
                    "MOSAIC image without NumberOfImagesInMosaic "
                    "(CSA header or (0019,xx0A)): cannot be un-tiled",
                )
            )
            return
        if grid is not None:
            rows, cols = image_matrix(ds)
            if rows % grid.rows or cols % grid.per_row:
                layout.problems.append(
                    Problem(
                        ProblemKind.INCONSISTENT_GEOMETRY,
                        f"mosaic of {rows}x{cols} cannot hold {grid.count} equal tiles",
                    )
                )
                return


def _check_geometry(layout: Layout) -> bool:
    frames = layout.frames
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        layout.problems.append(
            Problem(
                ProblemKind.INCONSISTENT_GEOMETRY,
                f"images have different matrix sizes {sorted(sizes)}",
            )
        )
    spacings = {tuple(round(mm, 3) for mm in f.pixel_spacing) for f in frames}
    if len(spacings) > 1:
        layout.problems.append(
            Problem(
                ProblemKind.INCONSISTENT_GEOMETRY,
                f"images have different pixel spacings {sorted(spacings)}",
            )
        )
    ref = np.asarray(frames[0].orientation)
    orientations = [ref]
    for f in frames:
        o = np.asarray(f.orientation)
        if all(np.max(np.abs(o - r)) > ORIENTATION_TOL for r in orientations):
            orientations.append(o)
    if len(orientations) > 1:
        layout.problems.append(
            Problem(
                ProblemKind.SEVERAL_STACKS,
                f"{len(orientations)} different image orientations in one series",
            )
        )
    return not layout.problems


def _check_stacks(layout: Layout, normal: NDArray[np.float64], slice_of: list[int]) -> None:
    origins: dict[int, NDArray[np.float64]] = {}
    overlapping = 0
    for f, k in zip(layout.frames, slice_of, strict=True):
        p = np.asarray(f.position)
        inplane = p - np.dot(p, normal) * normal
        if k not in origins:
            origins[k] = inplane
        elif np.linalg.norm(inplane - origins[k]) > INPLANE_TOL_MM:
            overlapping += 1
    if overlapping:
        layout.problems.append(
            Problem(
                ProblemKind.SEVERAL_STACKS,
                f"{overlapping} image(s) overlap others at the same slice "
                "location with a different in-plane origin",
            )
        )
    stacks = {f.stack_id for f in layout.frames if f.stack_id is not None}
    if len(stacks) > 1:
        layout.problems.append(
            Problem(ProblemKind.SEVERAL_STACKS, f"Stack ID (0020,9056) has {len(stacks)} values")
        )


def _check_spacing(layout: Layout) -> None:
    pos = layout.slice_positions
    if len(pos) < 3:
        return
    gaps = np.diff(pos)
    median = float(np.median(gaps))
    if np.any(np.abs(gaps - median) > SPACING_REL_TOL * median):
        layout.problems.append(
            Problem(
                ProblemKind.MISSING_SLICES,
                f"irregular slice spacing (gaps {np.round(gaps, 2).tolist()}"
                " mm): slices missing or stacks interleaved",
            )
        )


def _plan_volumes(
    layout: Layout, slice_of: list[int], *, b0_threshold: float, rel_tol: float
) -> None:
    frames = layout.frames
    known_b = sorted({f.diffusion.b for f in frames if f.diffusion.b is not None})
    shells: dict[float, int] = {}
    for shell, members in enumerate(
        group_bvalues(known_b, rel_tol=rel_tol, b0_threshold=b0_threshold)
    ):
        for i in members:
            shells[known_b[i]] = shell
    # Frames sharing shell, direction and vendor volume id are repeats of one volume kind;
    # at each slice the n-th acquired frame of a kind belongs to the n-th volume of that kind.
    kinds: dict[tuple[Any, ...], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, f in enumerate(frames):
        d = f.diffusion
        key = (_b_key(d.b, shells), direction_key(d.direction), d.volume_id)
        kinds[key][slice_of[i]].append(i)
    n_slices = len(layout.slice_positions)
    volumes: list[VolumePlan] = []
    for key, per_slice in kinds.items():
        counts = {len(v) for v in per_slice.values()}
        if len(per_slice) != n_slices or len(counts) > 1:
            b = frames[next(iter(per_slice.values()))[0]].diffusion.b
            have = sum(len(v) for v in per_slice.values())
            reps = max(counts)
            layout.problems.append(
                Problem(
                    ProblemKind.MISSING_SLICES,
                    f"b={'?' if b is None else format(b, 'g')}"
                    f"{'' if key[1] is None else f' direction {key[1]}'}: {have} image(s) for "
                    f"{reps} volume(s) of {n_slices} slices",
                )
            )
            continue
        for rep in range(counts.pop()):
            idx = [
                sorted(per_slice[k], key=lambda i: frames[i].order)[rep] for k in range(n_slices)
            ]
            bs = [frames[i].diffusion.b for i in idx]
            b = None if any(x is None for x in bs) else _typical([x for x in bs if x is not None])
            first = frames[idx[0]].diffusion
            volumes.append(
                VolumePlan(
                    b, first.direction, first.directionality, idx, min(frames[i].order for i in idx)
                )
            )
    volumes.sort(key=lambda v: v.order)
    layout.volumes = volumes


def _typical(values: list[float]) -> float:
    """The value shared by a volume's slices (most common; ties → smallest)."""
    counts: dict[float, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return min(counts, key=lambda v: (-counts[v], v))
