"""Every 2-D image of a diffusion series as a :class:`FrameRef`, whatever its storage style.

Three storage styles reach the node (notes/dicom.md): classic single-frame images (PS3.3
A.4 MR Image), enhanced multi-frame objects whose geometry and diffusion live in functional
groups (PS3.3 C.7.6.16, A.36 Enhanced MR Image), and mosaics (Siemens MOSAIC, UIH VFRAME
grids) that tile all slices of a volume into one image. Each is expanded here into one record
per 2-D image with its position, orientation, diffusion and rescale; :mod:`.layout` then orders
them into slices and volumes.

Where the standard plane attributes are missing, vendor fallbacks are read: the UIH MR VFrame
Sequence (0065,xx51) holds each slice's ImagePositionPatient (and, in some exports, its
ImageOrientationPatient). Series-level vendor rules that no single image can decide (Toshiba/
Canon b=0 images without any b tag) are applied after expansion. :func:`placement_gaps` names
exactly which attribute keeps an image from being placed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    B0_THRESHOLD,
    SIEMENS_MR,
    UIH_IMAGE,
    BValueSource,
    DiffusionInfo,
    diffusion_info,
    private_value,
)
from dicom_node.series.csa import csa_floats, csa_image_header, csa_int
from dicom_node.series.headers import floats, number
from dicom_node.series.vendors import VendorFamily, vendor_family

__all__ = [
    "FrameRef",
    "Orientation",
    "StorageStyle",
    "TileGrid",
    "Vec3",
    "describe_gaps",
    "expand_frames",
    "image_matrix",
    "imply_vendor_b0",
    "is_siemens_mosaic",
    "placement_gaps",
    "stated_pixel_spacing",
    "storage_style",
    "tile_grid",
]

Vec3 = tuple[float, float, float]
#: ImageOrientationPatient: row then column direction cosines.
Orientation = tuple[float, float, float, float, float, float]
#: Position, orientation and pixel spacing (row, column) of one image.
_Plane = tuple[Vec3, Orientation, tuple[float, float]]


class StorageStyle(Enum):
    """How a series stores its slices."""

    CLASSIC = "classic"
    ENHANCED = "enhanced"
    MOSAIC = "mosaic"


@dataclass(frozen=True)
class FrameRef:
    """One 2-D image inside the series and everything needed to place and decode it."""

    dataset_index: int
    frame_index: int | None  # 0-based frame of an enhanced object
    tile_index: int | None  # 0-based tile of a mosaic
    position: Vec3  # ImagePositionPatient of the (un-tiled) frame
    orientation: Orientation
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    columns: int
    diffusion: DiffusionInfo
    order: tuple[float, ...]  # acquisition order (vendor volume order, instance, frame, tile)
    sop_instance_uid: str
    rescale: tuple[float, float]  # (slope, intercept)
    stack_id: str | None = None
    tiles_per_row: int = 1  # mosaic tiles per row (to cut the tile out)


def image_matrix(ds: Dataset) -> tuple[int, int]:
    """(Rows, Columns) of a dataset, 0 where absent."""
    return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)


def is_siemens_mosaic(ds: Dataset) -> bool:
    """Image Type (0008,0008) says MOSAIC: Siemens tiled all slices into this image."""
    return "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", []) or []]


def _mosaic_count(ds: Dataset, csa: dict[str, list[str]] | None) -> int | None:
    if is_siemens_mosaic(ds):
        n = csa_int(csa, "NumberOfImagesInMosaic")
        if n is None:
            n = int(number(private_value(ds, 0x0019, SIEMENS_MR, 0x0A), 0)) or None
        return n
    return None


def _uih_grid_count(ds: Dataset) -> int | None:
    n = int(number(private_value(ds, 0x0065, UIH_IMAGE, 0x50), 0))
    return n if n > 1 else None


@dataclass(frozen=True)
class TileGrid:
    """How a mosaic tiles its slices into one image, row by row."""

    count: int  # slices (tiles) in the image
    per_row: int
    rows: int
    #: Siemens MOSAIC (square grid) rather than a UIH VFRAME grid (ceil(count / per_row) rows).
    siemens: bool


def tile_grid(ds: Dataset, csa: dict[str, list[str]] | None) -> TileGrid | None:
    """The mosaic grid of a classic image, ``None`` when it is not a mosaic."""
    n_mosaic = _mosaic_count(ds, csa)
    n = n_mosaic or _uih_grid_count(ds)
    if not n:
        return None
    per_row = math.ceil(math.sqrt(n))
    rows = per_row if n_mosaic else math.ceil(n / per_row)
    return TileGrid(count=n, per_row=per_row, rows=rows, siemens=bool(n_mosaic))


def storage_style(ds: Dataset) -> StorageStyle:
    """Classic, enhanced (functional groups) or mosaic storage of one dataset."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return StorageStyle.ENHANCED
    if tile_grid(ds, csa_image_header(ds)) is not None:
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


def stated_pixel_spacing(ds: Dataset, frame: FrameRef) -> bool:
    """Whether ``ds`` states the PixelSpacing of ``frame`` (top level, or in the frame's Pixel
    Measures functional group). :func:`expand_frames` assumes 1 mm when it does not, which
    places b-values but would misplace another series' voxels on the DWI grid."""
    if frame.frame_index is None:
        return floats(ds.get("PixelSpacing"), 2) is not None
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame.frame_index]
    measures = _fg_item(per_frame, shared_seq[0] if shared_seq else None, "PixelMeasuresSequence")
    return measures is not None and floats(measures.get("PixelSpacing"), 2) is not None


def _order_base(ds: Dataset, info: DiffusionInfo) -> tuple[float, float]:
    vendor = float(info.volume_order) if info.volume_order is not None else -1.0
    return vendor, number(ds.get("InstanceNumber"), 0.0)


def _plane(position: Any, orientation: Any, spacing: Any) -> _Plane | None:
    """ImagePositionPatient, ImageOrientationPatient and PixelSpacing of one image (spacing 1 mm
    when absent); ``None`` when the image cannot be placed."""
    pos = floats(position, 3)
    iop = floats(orientation, 6)
    mm = floats(spacing, 2) or (1.0, 1.0)
    if pos is None or iop is None:
        return None
    return (
        (pos[0], pos[1], pos[2]),
        (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
        (mm[0], mm[1]),
    )


def _frame_ref(
    index: int,
    ds: Dataset,
    info: DiffusionInfo,
    plane: _Plane,
    *,
    rescale_from: Dataset,
    order: tuple[float, ...],
    frame_index: int | None = None,
    stack_id: str | None = None,
) -> FrameRef:
    """The frame record of one placed image of ``ds`` (rescale read from ``rescale_from``)."""
    rows, cols = image_matrix(ds)
    position, orientation, spacing = plane
    slope = number(rescale_from.get("RescaleSlope"), 1.0)
    intercept = number(rescale_from.get("RescaleIntercept"), 0.0)
    return FrameRef(
        dataset_index=index,
        frame_index=frame_index,
        tile_index=None,
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        rows=rows,
        columns=cols,
        diffusion=info,
        order=order,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        rescale=(slope, intercept),
        stack_id=stack_id,
    )


def _uih_vframes(ds: Dataset) -> list[Dataset]:
    """Items of the UIH MR VFrame Sequence (0065,xx51): one per slice of a VFRAME grid."""
    seq = private_value(ds, 0x0065, UIH_IMAGE, 0x51)
    try:
        return [item for item in seq if isinstance(item, Dataset)] if seq is not None else []
    except TypeError:
        return []


#: Where a classic image's plane may come from, for :func:`placement_gaps` messages.
IPP = "ImagePositionPatient (0020,0032)"
IOP = "ImageOrientationPatient (0020,0037)"
_UIH_FALLBACK = "UIH MR VFrame Sequence (0065,xx51)"
PLANE_POSITION = "Plane Position Sequence (0020,9113) > ImagePositionPatient"
PLANE_ORIENTATION = "Plane Orientation Sequence (0020,9116) > ImageOrientationPatient"


def _classic_position(ds: Dataset, vframes: Sequence[Dataset]) -> tuple[Any, bool]:
    """ImagePositionPatient of a classic image and whether it is the image's own (top level)
    value, else the first UIH VFrame item's (the first slice of the grid)."""
    if floats(ds.get("ImagePositionPatient"), 3) is not None:
        return ds.get("ImagePositionPatient"), True
    for item in vframes[:1]:
        if floats(item.get("ImagePositionPatient"), 3) is not None:
            return item.get("ImagePositionPatient"), False
    return None, False


def _classic_orientation(ds: Dataset, vframes: Sequence[Dataset]) -> Any:
    """ImageOrientationPatient at top level, else from the first UIH VFrame item carrying it."""
    if floats(ds.get("ImageOrientationPatient"), 6) is not None:
        return ds.get("ImageOrientationPatient")
    for item in vframes:
        if floats(item.get("ImageOrientationPatient"), 6) is not None:
            return item.get("ImageOrientationPatient")
    return None


def placement_gaps(ds: Dataset) -> tuple[int, Counter[str]]:
    """(2-D images stored in ``ds``, {missing attribute: images lacking it}).

    Counts only what :func:`expand_frames` could not replace by a vendor fallback, so a
    report can say e.g. "ImagePositionPatient (0020,0032) missing on 520 of 520 images".
    """
    gaps: Counter[str] = Counter()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None:
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        for frame in per_frame:
            position = _fg_item(frame, shared, "PlanePositionSequence")
            orient = _fg_item(frame, shared, "PlaneOrientationSequence")
            if position is None or floats(position.get("ImagePositionPatient"), 3) is None:
                gaps[PLANE_POSITION] += 1
            if orient is None or floats(orient.get("ImageOrientationPatient"), 6) is None:
                gaps[PLANE_ORIENTATION] += 1
        return len(per_frame), gaps
    vframes = _uih_vframes(ds)
    if _classic_position(ds, vframes)[0] is None:
        gaps[IPP] += 1
    if _classic_orientation(ds, vframes) is None:
        gaps[IOP] += 1
    return 1, gaps


def describe_gaps(gaps: Counter[str], total: int) -> str:
    """``"<attribute> missing on <n> of <total> images[ and no <fallback> value]"``, joined."""
    fallback = {IPP: f" and no {_UIH_FALLBACK} value", IOP: f" and no {_UIH_FALLBACK} value"}
    return "; ".join(
        f"{name} missing on {n} of {total} images{fallback.get(name, '')}"
        for name, n in sorted(gaps.items())
    )


def _classic_frames(index: int, ds: Dataset) -> list[FrameRef]:
    csa = csa_image_header(ds)
    info = diffusion_info(ds, csa=csa)
    vframes = _uih_vframes(ds)
    position, own_position = _classic_position(ds, vframes)
    plane = _plane(position, _classic_orientation(ds, vframes), ds.get("PixelSpacing"))
    if plane is None:
        return []
    base = _order_base(ds, info)
    image = _frame_ref(index, ds, info, plane, rescale_from=ds, order=(*base, 0.0, 0.0))
    grid = tile_grid(ds, csa)
    if grid is None:
        return [image]
    pos, iop, spacing = plane
    rows, cols = image.rows, image.columns
    t_rows, t_cols = rows // grid.rows, cols // grid.per_row
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    snv = csa_floats(csa, "SliceNormalVector")
    if len(snv) == 3 and np.linalg.norm(snv) > 0:
        normal = np.asarray(snv) / np.linalg.norm(snv)
    # The mosaic's own IPP is the corner of the whole tiled image centred on the tile stack;
    # a position taken from the first UIH VFrame item is already the first slice's.
    first = np.asarray(pos)
    if own_position:
        first = (
            first
            + row_dir * spacing[1] * (cols - t_cols) / 2.0
            + col_dir * spacing[0] * (rows - t_rows) / 2.0
        )
    gap = number(ds.get("SpacingBetweenSlices"), 0.0) or number(ds.get("SliceThickness"), 1.0)
    if grid.siemens:
        vframes = []
    out = []
    for k in range(grid.count):
        p = first + k * gap * normal
        if k < len(vframes):
            explicit = floats(vframes[k].get("ImagePositionPatient"), 3)
            if explicit is not None:
                p = np.asarray(explicit)
        out.append(
            replace(
                image,
                tile_index=k,
                position=(float(p[0]), float(p[1]), float(p[2])),
                rows=t_rows,
                columns=t_cols,
                order=(*base, 0.0, float(k)),
                tiles_per_row=grid.per_row,
            )
        )
    return out


def _enhanced_frames(index: int, ds: Dataset) -> list[FrameRef]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    out = []
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        info = diffusion_info(ds, frame, shared=shared)
        position = _fg_item(frame, shared, "PlanePositionSequence")
        orient = _fg_item(frame, shared, "PlaneOrientationSequence")
        measures = _fg_item(frame, shared, "PixelMeasuresSequence")
        pvt = _fg_item(frame, shared, "PixelValueTransformationSequence")
        content = _fg_item(frame, shared, "FrameContentSequence")
        plane = _plane(
            position.get("ImagePositionPatient") if position else None,
            orient.get("ImageOrientationPatient") if orient else None,
            measures.get("PixelSpacing") if measures else None,
        )
        if plane is None:
            continue
        stack = str(content.get("StackID")) if content and "StackID" in content else None
        out.append(
            _frame_ref(
                index,
                ds,
                info,
                plane,
                rescale_from=pvt if pvt is not None else ds,
                order=(*_order_base(ds, info), float(f), 0.0),
                frame_index=f,
                stack_id=stack,
            )
        )
    return out


def imply_vendor_b0(
    datasets: Sequence[Dataset], infos: Sequence[DiffusionInfo]
) -> list[DiffusionInfo]:
    """``infos`` with b=0 for Toshiba/Canon images that carry no b-value in a diffusion series.

    Toshiba and Canon populate (0018,9087) only where a diffusion gradient is applied (dcm2niix
    Canon/README.md), classic or enhanced, with or without an MR Diffusion Sequence on the b=0
    image. An image without any b-value is b=0 when the series is of that family (Manufacturer
    or TOSHIBA/CANON private creators) and other images of it do carry b > 0. For every other
    family a missing b stays missing and is reported.
    """
    if not any(d.b is None for d in infos) or not any(
        d.b is not None and d.b >= B0_THRESHOLD for d in infos
    ):
        return list(infos)
    if not any(vendor_family(ds) is VendorFamily.CANON for ds in datasets):
        return list(infos)
    return [
        replace(d, b=0.0, source=BValueSource.IMPLIED_B0_SERIES, direction=None)
        if d.b is None
        else d
        for d in infos
    ]


def expand_frames(datasets: Sequence[Dataset]) -> list[FrameRef]:
    """Every 2-D image of ``datasets`` (frames of enhanced objects, tiles of mosaics)."""
    frames: list[FrameRef] = []
    for i, ds in enumerate(datasets):
        if "PerFrameFunctionalGroupsSequence" in ds:
            frames.extend(_enhanced_frames(i, ds))
        else:
            frames.extend(_classic_frames(i, ds))
    infos = imply_vendor_b0(datasets, [f.diffusion for f in frames])
    return [
        f if f.diffusion is d else replace(f, diffusion=d)
        for f, d in zip(frames, infos, strict=True)
    ]
