"""From the DICOM images of one diffusion series to a :class:`~dicom_node.series.volume.DwiVolume`.

Three storage styles reach the node (notes/dicom.md): classic single-frame images (PS3.3
A.4 MR Image), enhanced multi-frame objects whose geometry and diffusion live in functional
groups (PS3.3 C.7.6.16, A.36 Enhanced MR Image), and mosaics (Siemens MOSAIC, UIH VFRAME
grids) that tile all slices of a volume into one image. Each is first expanded into
:class:`FrameRef` records (one per 2-D image), then :func:`plan_layout` orders slices by
geometry (ImagePositionPatient · normal, PS3.3 C.7.6.2.1.1, never InstanceNumber), groups
frames into volumes by b-value, direction and vendor volume identity, and reports every reason
the series cannot be used. :func:`assemble_dwi` then decodes pixels (pydicom + pylibjpeg, so
compressed transfer syntaxes work), applies the Modality LUT (Rescale Slope/Intercept, PS3.3
C.11.1) and forms the trace per b by geometric mean over directions.
"""

from __future__ import annotations

import math
from collections import defaultdict
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
    UIH_IMAGE,
    DiffusionInfo,
    DirectionalityValues,
    diffusion_info,
    group_bvalues,
    private_value,
)
from dicom_node.series.csa import csa_floats, csa_image_header, csa_int
from dicom_node.series.volume import DwiVolume, Geometry

__all__ = [
    "AssemblyError",
    "FrameRef",
    "Layout",
    "Problem",
    "ProblemKind",
    "StorageStyle",
    "VolumePlan",
    "assemble_dwi",
    "expand_frames",
    "plan_layout",
    "storage_style",
]

Vec3 = tuple[float, float, float]

#: Slice positions closer than this (mm) along the normal are the same slice.
POSITION_TOL_MM = 0.05
#: Frames at one slice position whose in-plane origins differ by more than this belong to
#: different (overlapping) stacks.
INPLANE_TOL_MM = 0.5
#: ImageOrientationPatient cosines that differ by more than this are different orientations.
ORIENTATION_TOL = 1e-3
#: Relative deviation of slice gaps from their median that counts as irregular spacing.
SPACING_REL_TOL = 0.1


class StorageStyle(Enum):
    """How a series stores its slices."""

    CLASSIC = "classic"
    ENHANCED = "enhanced"
    MOSAIC = "mosaic"


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


class AssemblyError(ValueError):
    """The datasets do not form one usable diffusion volume; ``problems`` says why."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @property
    def kinds(self) -> set[ProblemKind]:
        return {p.kind for p in self.problems}


@dataclass(frozen=True)
class FrameRef:
    """One 2-D image inside the series and everything needed to place and decode it."""

    dataset_index: int
    frame_index: int | None  # 0-based frame of an enhanced object
    tile_index: int | None  # 0-based tile of a mosaic
    position: Vec3  # ImagePositionPatient of the (un-tiled) frame
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    columns: int
    diffusion: DiffusionInfo
    order: tuple[float, ...]  # acquisition order (vendor volume order, instance, frame, tile)
    sop_instance_uid: str
    rescale: tuple[float, float]  # (slope, intercept)
    stack_id: str | None = None
    tiles_per_row: int = 1  # mosaic tiles per row (to cut the tile out)


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


# --------------------------------------------------------------------------- frame expansion


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(math.isfinite(v) for v in vals) else None


def _num(value: Any, default: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _mosaic_count(ds: Dataset, csa: dict[str, list[str]] | None) -> int | None:
    image_type = [str(v).upper() for v in ds.get("ImageType", []) or []]
    if "MOSAIC" in image_type:
        n = csa_int(csa, "NumberOfImagesInMosaic")
        if n is None:
            n = int(_num(private_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0A), 0)) or None
        return n
    return None


def _uih_grid_count(ds: Dataset) -> int | None:
    n = int(_num(private_value(ds, 0x0065, UIH_IMAGE, 0x50), 0))
    return n if n > 1 else None


def storage_style(ds: Dataset) -> StorageStyle:
    """Classic, enhanced (functional groups) or mosaic storage of one dataset."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return StorageStyle.ENHANCED
    if _mosaic_count(ds, csa_image_header(ds)) or _uih_grid_count(ds):
        return StorageStyle.MOSAIC
    return StorageStyle.CLASSIC


def _fg_item(frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """Functional group macro item: per-frame wins over shared (PS3.3 C.7.6.16.1)."""
    for holder in (frame, shared):
        if holder is not None:
            seq = holder.get(keyword)
            if seq:
                item: Dataset = seq[0]
                return item
    return None


def _order_base(ds: Dataset, info: DiffusionInfo) -> tuple[float, float]:
    vendor = float(info.volume_order) if info.volume_order is not None else -1.0
    return vendor, _num(ds.get("InstanceNumber"), 0.0)


def _classic_frames(index: int, ds: Dataset) -> list[FrameRef]:
    csa = csa_image_header(ds)
    info = diffusion_info(ds, csa=csa)
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2) or (1.0, 1.0)
    if pos is None or iop is None:
        return []
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    rescale = (_num(ds.get("RescaleSlope"), 1.0), _num(ds.get("RescaleIntercept"), 0.0))
    base = _order_base(ds, info)
    uid = str(ds.get("SOPInstanceUID", ""))
    n_mosaic = _mosaic_count(ds, csa)
    n_grid = None if n_mosaic else _uih_grid_count(ds)
    if not n_mosaic and not n_grid:
        return [
            FrameRef(dataset_index=index, frame_index=None, tile_index=None,
                     position=(pos[0], pos[1], pos[2]), orientation=_six(iop),
                     pixel_spacing=(spacing[0], spacing[1]), rows=rows, columns=cols,
                     diffusion=info, order=(*base, 0.0, 0.0), sop_instance_uid=uid,
                     rescale=rescale)
        ]
    # Mosaic: tiles laid out row by row; Siemens uses a square grid, UIH ceil(n/nc) rows.
    n = n_mosaic or n_grid or 1
    per_row = math.ceil(math.sqrt(n))
    n_tile_rows = per_row if n_mosaic else math.ceil(n / per_row)
    t_rows, t_cols = rows // n_tile_rows, cols // per_row
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    snv = csa_floats(csa, "SliceNormalVector")
    if len(snv) == 3 and np.linalg.norm(snv) > 0:
        normal = np.asarray(snv) / np.linalg.norm(snv)
    # The mosaic's IPP is the corner of the whole tiled image centred on the tile stack.
    first = (
        np.asarray(pos)
        + row_dir * spacing[1] * (cols - t_cols) / 2.0
        + col_dir * spacing[0] * (rows - t_rows) / 2.0
    )
    gap = _num(ds.get("SpacingBetweenSlices"), 0.0) or _num(ds.get("SliceThickness"), 1.0)
    vframes = private_value(ds, 0x0065, UIH_IMAGE, 0x51) if n_grid else None
    out = []
    for k in range(n):
        p = first + k * gap * normal
        if vframes is not None and k < len(vframes):
            explicit = _floats(vframes[k].get("ImagePositionPatient"), 3)
            if explicit is not None:
                p = np.asarray(explicit)
        out.append(
            FrameRef(dataset_index=index, frame_index=None, tile_index=k,
                     position=(float(p[0]), float(p[1]), float(p[2])), orientation=_six(iop),
                     pixel_spacing=(spacing[0], spacing[1]), rows=t_rows, columns=t_cols,
                     diffusion=info, order=(*base, 0.0, float(k)), sop_instance_uid=uid,
                     rescale=rescale, tiles_per_row=per_row)
        )
    return out


def _six(v: tuple[float, ...]) -> tuple[float, float, float, float, float, float]:
    return (v[0], v[1], v[2], v[3], v[4], v[5])


def _enhanced_frames(index: int, ds: Dataset) -> list[FrameRef]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    uid = str(ds.get("SOPInstanceUID", ""))
    out = []
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        info = diffusion_info(ds, frame, shared=shared)
        plane = _fg_item(frame, shared, "PlanePositionSequence")
        orient = _fg_item(frame, shared, "PlaneOrientationSequence")
        measures = _fg_item(frame, shared, "PixelMeasuresSequence")
        pvt = _fg_item(frame, shared, "PixelValueTransformationSequence")
        content = _fg_item(frame, shared, "FrameContentSequence")
        pos = _floats(plane.get("ImagePositionPatient") if plane else None, 3)
        iop = _floats(orient.get("ImageOrientationPatient") if orient else None, 6)
        spacing = _floats(measures.get("PixelSpacing") if measures else None, 2) or (1.0, 1.0)
        if pos is None or iop is None:
            continue
        src = pvt if pvt is not None else ds
        rescale = (_num(src.get("RescaleSlope"), 1.0), _num(src.get("RescaleIntercept"), 0.0))
        stack = str(content.get("StackID")) if content and "StackID" in content else None
        out.append(
            FrameRef(dataset_index=index, frame_index=f, tile_index=None,
                     position=(pos[0], pos[1], pos[2]), orientation=_six(iop),
                     pixel_spacing=(spacing[0], spacing[1]), rows=rows, columns=cols,
                     diffusion=info, order=(*_order_base(ds, info), float(f), 0.0),
                     sop_instance_uid=uid, rescale=rescale, stack_id=stack)
        )
    return out


def expand_frames(datasets: Sequence[Dataset]) -> list[FrameRef]:
    """Every 2-D image of ``datasets`` (frames of enhanced objects, tiles of mosaics)."""
    frames: list[FrameRef] = []
    for i, ds in enumerate(datasets):
        if "PerFrameFunctionalGroupsSequence" in ds:
            frames.extend(_enhanced_frames(i, ds))
        else:
            frames.extend(_classic_frames(i, ds))
    return frames


# --------------------------------------------------------------------------- layout planning


def _cluster(values: Sequence[float], tol: float) -> list[float]:
    """Representative values of 1-D clusters (sorted), neighbours within ``tol`` merged."""
    centres: list[list[float]] = []
    for v in sorted(values):
        if centres and v - centres[-1][-1] <= tol:
            centres[-1].append(v)
        else:
            centres.append([v])
    return [float(np.mean(c)) for c in centres]


def _direction_key(d: Vec3 | None) -> tuple[float, ...] | None:
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
        StorageStyle.ENHANCED if StorageStyle.ENHANCED in styles
        else StorageStyle.MOSAIC if StorageStyle.MOSAIC in styles
        else StorageStyle.CLASSIC
    )
    frames = expand_frames(datasets)
    layout = Layout(storage=storage, frames=frames)
    _check_mosaics(datasets, layout)
    _check_placed(datasets, layout)
    if not frames:
        layout.problems.append(Problem(ProblemKind.NO_IMAGES, "no image with position and "
                                       "orientation (ImagePositionPatient/ImageOrientation"
                                       "Patient) was found"))
        return layout
    layout.frames_without_b = sum(1 for f in frames if f.diffusion.b is None)
    if not _check_geometry(layout):
        return layout
    iop = np.asarray(frames[0].orientation)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    dist = [float(np.dot(f.position, normal)) for f in frames]
    layout.slice_positions = _cluster(dist, POSITION_TOL_MM)
    gaps = np.abs(np.asarray(dist)[:, None] - np.asarray(layout.slice_positions)[None, :])
    slice_of = [int(k) for k in np.argmin(gaps, axis=1)]
    _check_stacks(layout, normal, slice_of)
    _check_spacing(layout)
    _plan_volumes(layout, slice_of, b0_threshold=b0_threshold, rel_tol=rel_tol)
    return layout


def _check_placed(datasets: Sequence[Dataset], layout: Layout) -> None:
    """Images without ImagePositionPatient/ImageOrientationPatient are reported, not lost."""
    placed: dict[int, int] = defaultdict(int)
    for f in layout.frames:
        placed[f.dataset_index] += 1
    unplaced = 0
    for i, ds in enumerate(datasets):
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        expected = len(per_frame) if per_frame is not None else 1
        unplaced += max(expected - placed[i], 0)
    if unplaced:
        layout.problems.append(Problem(ProblemKind.INCONSISTENT_GEOMETRY,
                                       f"{unplaced} image(s) without ImagePositionPatient/"
                                       "ImageOrientationPatient cannot be placed"))


def _check_mosaics(datasets: Sequence[Dataset], layout: Layout) -> None:
    for ds in datasets:
        csa = csa_image_header(ds)
        image_type = [str(v).upper() for v in ds.get("ImageType", []) or []]
        n = _mosaic_count(ds, csa) or _uih_grid_count(ds)
        if "MOSAIC" in image_type and not n:
            layout.problems.append(Problem(ProblemKind.UNSUPPORTED_PIXELS,
                                           "MOSAIC image without NumberOfImagesInMosaic "
                                           "(CSA header or (0019,xx0A)): cannot be un-tiled"))
            return
        if n:
            per_row = math.ceil(math.sqrt(n))
            tile_rows = per_row if "MOSAIC" in image_type else math.ceil(n / per_row)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            if rows % tile_rows or cols % per_row:
                layout.problems.append(Problem(
                    ProblemKind.INCONSISTENT_GEOMETRY,
                    f"mosaic of {rows}x{cols} cannot hold {n} equal tiles"))
                return


def _check_geometry(layout: Layout) -> bool:
    frames = layout.frames
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        layout.problems.append(Problem(ProblemKind.INCONSISTENT_GEOMETRY,
                                       f"images have different matrix sizes {sorted(sizes)}"))
    spacings = {tuple(round(s, 3) for s in f.pixel_spacing) for f in frames}
    if len(spacings) > 1:
        layout.problems.append(Problem(ProblemKind.INCONSISTENT_GEOMETRY,
                                       f"images have different pixel spacings {sorted(spacings)}"))
    ref = np.asarray(frames[0].orientation)
    orientations = [ref]
    for f in frames:
        o = np.asarray(f.orientation)
        if all(np.max(np.abs(o - r)) > ORIENTATION_TOL for r in orientations):
            orientations.append(o)
    if len(orientations) > 1:
        layout.problems.append(Problem(ProblemKind.SEVERAL_STACKS,
                                       f"{len(orientations)} different image orientations in "
                                       "one series"))
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
        layout.problems.append(Problem(ProblemKind.SEVERAL_STACKS,
                                       f"{overlapping} image(s) overlap others at the same slice "
                                       "location with a different in-plane origin"))
    stacks = {f.stack_id for f in layout.frames if f.stack_id is not None}
    if len(stacks) > 1:
        layout.problems.append(Problem(ProblemKind.SEVERAL_STACKS,
                                       f"Stack ID (0020,9056) has {len(stacks)} values"))


def _check_spacing(layout: Layout) -> None:
    pos = layout.slice_positions
    if len(pos) < 3:
        return
    gaps = np.diff(pos)
    median = float(np.median(gaps))
    if np.any(np.abs(gaps - median) > SPACING_REL_TOL * median):
        layout.problems.append(Problem(ProblemKind.MISSING_SLICES,
                                       f"irregular slice spacing (gaps {np.round(gaps, 2).tolist()}"
                                       " mm): slices missing or stacks interleaved"))


def _plan_volumes(layout: Layout, slice_of: list[int], *, b0_threshold: float,
                  rel_tol: float) -> None:
    frames = layout.frames
    known_b = sorted({f.diffusion.b for f in frames if f.diffusion.b is not None})
    shells: dict[float, int] = {}
    for s, members in enumerate(group_bvalues(known_b, rel_tol=rel_tol,
                                              b0_threshold=b0_threshold)):
        for i in members:
            shells[known_b[i]] = s
    # Frames sharing shell, direction and vendor volume id are repeats of one volume kind;
    # at each slice the n-th acquired frame of a kind belongs to the n-th volume of that kind.
    kinds: dict[tuple[Any, ...], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, f in enumerate(frames):
        d = f.diffusion
        key = (_b_key(d.b, shells), _direction_key(d.direction), d.volume_id)
        kinds[key][slice_of[i]].append(i)
    n_slices = len(layout.slice_positions)
    volumes: list[VolumePlan] = []
    for key, per_slice in kinds.items():
        counts = {len(v) for v in per_slice.values()}
        if len(per_slice) != n_slices or len(counts) > 1:
            b = frames[next(iter(per_slice.values()))[0]].diffusion.b
            have = sum(len(v) for v in per_slice.values())
            reps = max(counts)
            layout.problems.append(Problem(
                ProblemKind.MISSING_SLICES,
                f"b={'?' if b is None else format(b, 'g')}"
                f"{'' if key[1] is None else f' direction {key[1]}'}: {have} image(s) for "
                f"{reps} volume(s) of {n_slices} slices"))
            continue
        for rep in range(counts.pop()):
            idx = [sorted(per_slice[k], key=lambda i: frames[i].order)[rep]
                   for k in range(n_slices)]
            bs = [frames[i].diffusion.b for i in idx]
            b = None if any(x is None for x in bs) else _typical([x for x in bs if x is not None])
            first = frames[idx[0]].diffusion
            volumes.append(VolumePlan(b, first.direction, first.directionality, idx,
                                      min(frames[i].order for i in idx)))
    volumes.sort(key=lambda v: v.order)
    layout.volumes = volumes


def _typical(values: list[float]) -> float:
    """The value shared by a volume's slices (most common; ties → smallest)."""
    counts: dict[float, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return min(counts, key=lambda v: (-counts[v], v))


# --------------------------------------------------------------------------- pixels and trace


class _PixelCache:
    """Decode each dataset's pixels once (pydicom handles compressed transfer syntaxes)."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self._datasets = datasets
        self._arrays: dict[int, NDArray[Any]] = {}

    def frame(self, f: FrameRef) -> NDArray[np.float64]:
        if f.dataset_index not in self._arrays:
            ds = self._datasets[f.dataset_index]
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                raise AssemblyError([Problem(ProblemKind.UNSUPPORTED_PIXELS,
                                             "colour images cannot be diffusion data")])
            try:
                self._arrays[f.dataset_index] = ds.pixel_array
            except Exception as exc:
                raise AssemblyError([Problem(
                    ProblemKind.UNSUPPORTED_PIXELS,
                    f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')}: {exc}")]
                ) from exc
        arr = self._arrays[f.dataset_index]
        if f.frame_index is not None:
            img = arr[f.frame_index] if arr.ndim == 3 else arr
        elif f.tile_index is not None:
            r, c = divmod(f.tile_index, f.tiles_per_row)
            img = arr[r * f.rows : (r + 1) * f.rows, c * f.columns : (c + 1) * f.columns]
        else:
            img = arr
        if img.shape != (f.rows, f.columns):
            raise AssemblyError([Problem(ProblemKind.UNSUPPORTED_PIXELS,
                                         f"pixel matrix {img.shape} does not match "
                                         f"Rows/Columns {(f.rows, f.columns)}")])
        slope, intercept = f.rescale
        return img.astype(np.float64) * slope + intercept


def _geometric_mean(stack: NDArray[np.float64]) -> NDArray[np.float64]:
    """Geometric mean over axis 0; non-positive signal gives 0 (log of 0 is -inf)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.clip(stack, 0.0, None))
    out: NDArray[np.float64] = np.exp(np.mean(logs, axis=0))
    return out


def _combine_shell(vols: list[tuple[VolumePlan, NDArray[np.float64]]],
                   notes: list[str], b: float) -> NDArray[np.float64]:
    directional = [(v, a) for v, a in vols if v.direction is not None
                   and v.directionality is not DirectionalityValues.ISOTROPIC]
    if directional and len(directional) < len(vols) and b >= B0_THRESHOLD:
        notes.append(f"b={b:g}: scanner trace image(s) ignored, trace recomputed from "
                     f"{len(directional)} directional volume(s)")
        vols = directional
    by_dir: dict[tuple[float, ...] | None, list[NDArray[np.float64]]] = defaultdict(list)
    for v, a in vols:
        by_dir[_direction_key(v.direction)].append(a)
    # Repeats of one direction are averaged; distinct directions form the trace.
    per_dir = [np.mean(arrs, axis=0) for arrs in by_dir.values()]
    if len(per_dir) > 1 and b >= B0_THRESHOLD:
        notes.append(f"b={b:g}: {len(per_dir)} directions combined into the trace by "
                     "geometric mean")
        return _geometric_mean(np.stack(per_dir))
    if len(vols) > 1:
        notes.append(f"b={b:g}: {len(vols)} volumes averaged")
    return np.asarray(np.mean(np.stack(per_dir), axis=0), dtype=np.float64)


_SHAPE_KEYWORDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel")


def check_headers(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`AssemblyError` naming every instance whose header pydicom cannot convert
    (unknown VR, wrong value length) or whose image shape attributes are not single integers;
    later steps may then read any attribute without guarding it."""
    problems = []
    for index, ds in enumerate(datasets):
        try:
            for _ in ds.iterall():  # converts every raw element, nested ones too
                pass
            for keyword in _SHAPE_KEYWORDS:
                value = ds.get(keyword)
                if value is not None:
                    int(value)
        except Exception as exc:  # pydicom raises many types on corrupt input
            problems.append(Problem(ProblemKind.UNREADABLE_HEADER,
                                    f"instance {index}: {type(exc).__name__}: {exc}"[:300]))
    if problems:
        raise AssemblyError(problems)


def assemble_dwi(
    datasets: Sequence[Dataset],
    *,
    b0_threshold: float = B0_THRESHOLD,
    rel_tol: float = GROUP_REL_TOL,
) -> DwiVolume:
    """Assemble one diffusion series into a trace-weighted ``(slice, row, col, b)`` volume.

    Raises :class:`AssemblyError` naming every problem found (missing b-values, several series
    or stacks, inconsistent geometry, missing slices, undecodable pixels).
    """
    if not datasets:
        raise AssemblyError([Problem(ProblemKind.NO_IMAGES, "no datasets given")])
    check_headers(datasets)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise AssemblyError([Problem(ProblemKind.MIXED_SERIES,
                                     f"{len(uids)} SeriesInstanceUIDs in the input")])
    layout = plan_layout(datasets, b0_threshold=b0_threshold, rel_tol=rel_tol)
    problems = list(layout.problems)
    if layout.frames_without_b:
        problems.insert(0, Problem(
            ProblemKind.MISSING_B_VALUES,
            f"{layout.frames_without_b} of {len(layout.frames)} images carry no b-value in any "
            "known convention ((0018,9087), MR Diffusion Sequence, Siemens/GE/Philips/UIH "
            "private tags, CSA header)"))
    if problems:
        raise AssemblyError(problems)
    if not layout.volumes:
        raise AssemblyError([Problem(ProblemKind.NO_IMAGES, "no complete volume found")])

    pixels = _PixelCache(datasets)
    frames = layout.frames
    loaded = [(v, np.stack([pixels.frame(frames[i]) for i in v.frames])) for v in layout.volumes]
    vol_b = [v.b if v.b is not None else 0.0 for v in layout.volumes]
    notes: list[str] = []
    trace: list[NDArray[np.float64]] = []
    bvals: list[float] = []
    for members in group_bvalues(vol_b, rel_tol=rel_tol, b0_threshold=b0_threshold):
        exact = sorted({vol_b[i] for i in members})
        b = exact[0] if len(exact) == 1 else float(np.mean([vol_b[i] for i in members]))
        if len(exact) > 1:
            notes.append(f"b-values {[format(x, 'g') for x in exact]} grouped as one shell "
                         f"(mean {b:g})")
        trace.append(_combine_shell([loaded[i] for i in members], notes, b))
        bvals.append(b)

    first = frames[layout.volumes[0].frames[0]]
    lowest = min(range(len(layout.volumes)), key=lambda i: (vol_b[i], layout.volumes[i].order))
    ds0 = datasets[first.dataset_index]
    positions = layout.slice_positions
    if len(positions) > 1:
        spacing = float(np.mean(np.diff(positions)))
    else:
        spacing = _num(ds0.get("SpacingBetweenSlices"), 0.0) or _num(ds0.get("SliceThickness"),
                                                                         1.0)
    geometry = Geometry(
        shape=(len(positions), first.rows, first.columns),
        origin=first.position,
        row_dir=(first.orientation[0], first.orientation[1], first.orientation[2]),
        col_dir=(first.orientation[3], first.orientation[4], first.orientation[5]),
        row_spacing=first.pixel_spacing[0],
        col_spacing=first.pixel_spacing[1],
        slice_spacing=spacing,
        frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "")),
    )
    if len(bvals) < 2:
        notes.append("only one b-value: the series alone cannot be fitted")
    return DwiVolume(
        data=np.stack(trace, axis=-1).astype(np.float32),
        bvals=np.asarray(bvals, dtype=np.float64),
        geometry=geometry,
        study_instance_uid=str(ds0.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
        slice_sop_instance_uids=[frames[i].sop_instance_uid
                                 for i in layout.volumes[lowest].frames],
        vendor=str(ds0.get("Manufacturer", "")),
        notes=notes,
    )
