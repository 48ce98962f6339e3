"""Tiny synthetic DICOM objects for every vendor diffusion convention in notes/dicom.md.

Each builder returns pydicom Datasets with File Meta Information (Explicit VR Little Endian) so
they can be used in memory or written with :func:`write` / :func:`write_gz`. Signals follow a
known ground truth (``signal``) so assembly can be checked numerically. Private tags are always
created through their private creator (``Dataset.private_block(..., create=True)``).
"""

from __future__ import annotations

import gzip
import io
import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Grid:
    """A small slice stack: ``n_slices`` of ``rows`` x ``cols`` in patient space."""

    rows: int = 4
    cols: int = 6
    n_slices: int = 3
    pixel_spacing: tuple[float, float] = (2.0, 1.5)  # (row spacing, column spacing)
    slice_gap: float = 4.0
    iop: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    origin: Vec3 = (-10.0, -20.0, 30.0)

    @property
    def normal(self) -> NDArray[np.float64]:
        return np.cross(np.asarray(self.iop[:3]), np.asarray(self.iop[3:]))

    def position(self, k: int) -> Vec3:
        p = np.asarray(self.origin) + k * self.slice_gap * self.normal
        return (float(p[0]), float(p[1]), float(p[2]))


@dataclass
class Vol:
    """One acquired volume: b, gradient direction and its stored (integer) signal."""

    b: float
    direction: Vec3 | None = None
    signal: NDArray[np.uint16] = field(default_factory=lambda: np.zeros((0, 0, 0), np.uint16))


def ground_truth(
    grid: Grid, b: float, diffusivity: float = 1.0e-3, seed: int = 0
) -> NDArray[np.uint16]:
    """Signal ``S0·exp(-b·D)`` with a slice- and pixel-dependent S0 (distinct per slice)."""
    k, i, j = np.meshgrid(
        np.arange(grid.n_slices), np.arange(grid.rows), np.arange(grid.cols), indexing="ij"
    )
    s0 = 1000.0 + 300.0 * k + 10.0 * i + j + seed
    return np.round(s0 * np.exp(-b * diffusivity)).astype(np.uint16)


def volumes(
    grid: Grid,
    shells: Sequence[tuple[float, Sequence[Vec3 | None]]],
    diffusivities: Sequence[float] = (1.0e-3, 0.6e-3, 1.6e-3, 0.9e-3),
) -> list[Vol]:
    """One :class:`Vol` per (b, direction); each direction gets its own diffusivity."""
    out = []
    for b, directions in shells:
        for n, d in enumerate(directions):
            sig = ground_truth(grid, b, diffusivities[n % len(diffusivities)])
            out.append(Vol(b, d, sig))
    return out


# --------------------------------------------------------------------------- basic objects


def base_dataset(
    *,
    study_uid: str,
    series_uid: str,
    instance: int,
    manufacturer: str = "",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "OTHER"),
    sop_class: UID = MR_IMAGE_STORAGE,
    body_part: str | None = "BREAST",
    description: str = "ep2d_diff",
) -> Dataset:
    """A minimal MR image header (PS3.3 A.4) with File Meta Information."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=[study_uid])
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.SeriesNumber = 5
    ds.SeriesDescription = description
    ds.PatientID = "SYNTH"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    return ds


def set_pixels(ds: Dataset, arr: NDArray[np.integer], *, frames: int | None = None) -> None:
    """Store unsigned 16-bit pixels (PS3.3 C.7.6.3 Image Pixel module)."""
    arr = np.ascontiguousarray(arr.astype(np.uint16))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()


def set_plane(ds: Dataset, grid: Grid, position: Vec3) -> None:
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
    ds.PixelSpacing = [f"{v:g}" for v in grid.pixel_spacing]
    ds.SliceThickness = f"{grid.slice_gap:g}"
    ds.SpacingBetweenSlices = f"{grid.slice_gap:g}"


def write(ds: Dataset, path: Path) -> Path:
    """Write a DICOM Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_gz(ds: Dataset, path: Path) -> Path:
    """Write a gzip-wrapped DICOM Part 10 file (as in the Philips test corpus)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


# --------------------------------------------------------------------------- vendor tags

TagFn = Callable[[Dataset, Vol], None]


def tag_standard(ds: Dataset, vol: Vol) -> None:
    """Standard (0018,9087) and (0018,9089) at top level (Philips/Siemens classic style)."""
    ds.DiffusionBValue = vol.b
    if vol.direction is not None:
        ds.DiffusionGradientOrientation = list(vol.direction)


def tag_ge(ds: Dataset, vol: Vol, *, offset: bool = True) -> None:
    """GE: (0043,xx39) first value (+10⁹ offset variant), (0018,9087) only when b>0,
    directions in (0019,xxBB/BC/BD)."""
    first = int(vol.b) + (1_000_000_000 if offset else 0)
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [first, 8, 0, 0])
    if vol.b > 0:
        ds.DiffusionBValue = vol.b
    if vol.direction is not None:
        block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        for off, v in zip((0xBB, 0xBC, 0xBD), vol.direction, strict=True):
            block.add_new(off, "DS", f"{v:.6f}")


def tag_canon(ds: Dataset, vol: Vol) -> None:
    """Toshiba/Canon: MR Diffusion Sequence on every image; no b at all on b=0 images."""
    item = Dataset()
    if vol.b > 0:
        item.DiffusionBValue = vol.b
        ds.DiffusionBValue = vol.b
        item.DiffusionDirectionality = "ISOTROPIC" if vol.direction is None else "DIRECTIONAL"
    else:
        item.DiffusionDirectionality = "NONE"
    ds.MRDiffusionSequence = DicomSequence([item])


def tag_uih(ds: Dataset, vol: Vol) -> None:
    """UIH: effective b in (0065,xx09) FD, gradient in (0065,xx37) FD×3."""
    block = ds.private_block(0x0065, "Image Private Header", create=True)
    block.add_new(0x09, "FD", vol.b)
    if vol.direction is not None:
        block.add_new(0x37, "FD", list(vol.direction))


def tag_philips(
    ds: Dataset, vol: Vol, *, b_number: int = 1, gradient: int = 1, order: int | None = None
) -> None:
    """Philips: (2001,xx03) FL + (0018,9087), volume ids (2005,xx12/13), order (2005,xx96)."""
    tag_standard(ds, vol)
    ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
        0x03, "FL", float(vol.b)
    )
    ds.private_block(0x2001, "Philips Imaging DD 001").add_new(
        0x04, "CS", "O" if vol.direction is not None else "I"
    )
    block = ds.private_block(0x2005, "Philips MR Imaging DD 005", create=True)
    block.add_new(0x12, "IS", str(b_number))
    block.add_new(0x13, "IS", str(gradient))
    if order is not None:
        ds.private_block(0x2005, "Philips MR Imaging DD 006", create=True).add_new(
            0x96, "IS", str(order)
        )


def tag_siemens(ds: Dataset, vol: Vol) -> None:
    """Siemens classic: (0019,xx0C) B_value, (0019,xx0E) direction, SequenceName."""
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", str(int(vol.b)))
    block.add_new(0x0D, "CS", "DIRECTIONAL" if vol.direction else "ISOTROPIC")
    if vol.direction is not None:
        block.add_new(0x0E, "FD", list(vol.direction))
    ds.SequenceName = f"*ep_b{int(vol.b)}t"


def tag_none(ds: Dataset, vol: Vol) -> None:
    """No b-value anywhere (an unusable export)."""


# --------------------------------------------------------------------------- series builders


def classic_series(
    grid: Grid,
    vols: Sequence[Vol],
    tag: TagFn = tag_standard,
    *,
    manufacturer: str = "",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
    shuffle_seed: int | None = 7,
    rescale: tuple[float, float] | None = None,
    body_part: str | None = "BREAST",
    description: str = "ep2d_diff",
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> list[Dataset]:
    """One classic image per slice and volume; instance numbers scrambled when seeded."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    n = len(vols) * grid.n_slices
    numbers = list(range(1, n + 1))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(numbers)
    out = []
    for v_i, vol in enumerate(vols):
        for k in range(grid.n_slices):
            ds = base_dataset(
                study_uid=study_uid,
                series_uid=series_uid,
                instance=numbers[v_i * grid.n_slices + k],
                manufacturer=manufacturer,
                image_type=image_type,
                body_part=body_part,
                description=description,
            )
            set_plane(ds, grid, grid.position(k))
            stored = vol.signal[k]
            if rescale is not None:
                ds.RescaleSlope = f"{rescale[0]:g}"
                ds.RescaleIntercept = f"{rescale[1]:g}"
                stored = np.round((vol.signal[k] - rescale[1]) / rescale[0]).astype(np.uint16)
            set_pixels(ds, stored)
            tag(ds, vol)
            out.append(ds)
    if shuffle_seed is not None:
        random.Random(shuffle_seed + 1).shuffle(out)
    return out


# --------------------------------------------------------------------------- Siemens CSA / mosaic


def csa2_header(tags: dict[str, list[str]], *, csa1: bool = False) -> bytes:
    """A CSA2 ("SV10") or CSA1 header with the given tag items (layout: see dicom_node.series.csa)."""
    out = b"" if csa1 else b"SV10\x04\x03\x02\x01"
    out += struct.pack("<2I", len(tags), 77)
    for name, values in tags.items():
        n_items = max(len(values), 1)
        out += name.encode("latin-1").ljust(64, b"\0")
        out += struct.pack("<i4siii", len(values), b"DS\0\0", 3, n_items, 77)
        for i in range(n_items):
            data = values[i].encode("latin-1") + b"\0" if i < len(values) else b""
            x0 = len(data) + len(tags) if csa1 else len(data)
            out += struct.pack("<4i", x0, len(data), 77, len(data))
            out += data + b"\0" * ((4 - len(data) % 4) % 4)
    return out


def add_csa(ds: Dataset, tags: dict[str, list[str]]) -> None:
    """Attach a CSA Image Header Info (0029,xx10) under creator SIEMENS CSA HEADER."""
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x08, "CS", "IMAGE NUM 4")
    block.add_new(0x10, "OB", csa2_header(tags))


def tile(volume: NDArray[np.uint16], per_row: int, n_tile_rows: int) -> NDArray[np.uint16]:
    """Lay slices ``(n, r, c)`` out as a mosaic, row by row, zero-filled."""
    n, r, c = volume.shape
    mosaic = np.zeros((n_tile_rows * r, per_row * c), np.uint16)
    for k in range(n):
        i, j = divmod(k, per_row)
        mosaic[i * r : (i + 1) * r, j * c : (j + 1) * c] = volume[k]
    return mosaic


def mosaic_corner(grid: Grid, mosaic_rows: int, mosaic_cols: int) -> Vec3:
    """ImagePositionPatient written in a mosaic: corner of the whole tiled image."""
    row_dir, col_dir = np.asarray(grid.iop[:3]), np.asarray(grid.iop[3:])
    p = (
        np.asarray(grid.position(0))
        - row_dir * grid.pixel_spacing[1] * (mosaic_cols - grid.cols) / 2.0
        - col_dir * grid.pixel_spacing[0] * (mosaic_rows - grid.rows) / 2.0
    )
    return (float(p[0]), float(p[1]), float(p[2]))


def siemens_mosaic_series(
    grid: Grid, vols: Sequence[Vol], *, study_uid: str | None = None
) -> list[Dataset]:
    """VB-era Siemens mosaics: one file per volume, b and geometry only in the CSA header."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    per_row = math.ceil(math.sqrt(grid.n_slices))
    out = []
    for v_i, vol in enumerate(vols):
        ds = base_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            instance=v_i + 1,
            manufacturer="SIEMENS",
            image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"),
        )
        mosaic = tile(vol.signal, per_row, per_row)
        set_plane(ds, grid, mosaic_corner(grid, *mosaic.shape))
        set_pixels(ds, mosaic)
        csa = {
            "NumberOfImagesInMosaic": [str(grid.n_slices)],
            "B_value": [f"{vol.b:g}"],
            "SliceNormalVector": [f"{v:.8f}" for v in grid.normal],
            "DiffusionDirectionality": ["DIRECTIONAL" if vol.direction else "NONE"],
        }
        if vol.direction is not None:
            csa["DiffusionGradientDirection"] = [f"{v:.8f}" for v in vol.direction]
        add_csa(ds, csa)
        ds.SequenceName = "*ep_b0" if vol.b == 0 else f"*ep_b{int(vol.b)}#1"
        out.append(ds)
    return out


def uih_grid_series(grid: Grid, vols: Sequence[Vol]) -> list[Dataset]:
    """UIH VFRAME grid: tiles in ceil(√n) columns; slice count (0065,xx50), per-slice
    positions in the (0065,xx51) sequence, effective b in (0065,xx09)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    per_row = math.ceil(math.sqrt(grid.n_slices))
    n_tile_rows = math.ceil(grid.n_slices / per_row)
    out = []
    for v_i, vol in enumerate(vols):
        ds = base_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            instance=v_i + 1,
            manufacturer="UIH",
            image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "VFRAME"),
        )
        mosaic = tile(vol.signal, per_row, n_tile_rows)
        set_plane(ds, grid, grid.position(0))
        set_pixels(ds, mosaic)
        tag_uih(ds, vol)
        block = ds.private_block(0x0065, "Image Private Header")
        block.add_new(0x50, "DS", str(grid.n_slices))
        items = []
        for k in range(grid.n_slices):
            item = Dataset()
            item.ImagePositionPatient = [f"{v:.4f}" for v in grid.position(k)]
            items.append(item)
        block.add_new(0x51, "SQ", DicomSequence(items))
        out.append(ds)
    return out


# --------------------------------------------------------------------------- enhanced


def enhanced_series(
    grid: Grid,
    vols: Sequence[Vol],
    *,
    manufacturer: str = "Philips",
    omit_b0_value: bool = False,
    shuffle_seed: int | None = 3,
    slope: float = 1.0,
    stack_ids: Sequence[str] | None = None,
) -> Dataset:
    """One Enhanced MR Image (PS3.3 A.36) holding all frames, geometry and b per frame.

    ``omit_b0_value`` drops (0018,9087) from b=0 frames (Canon enhanced style).
    """
    study_uid, series_uid = generate_uid(), generate_uid()
    ds = base_dataset(
        study_uid=study_uid,
        series_uid=series_uid,
        instance=1,
        manufacturer=manufacturer,
        sop_class=ENHANCED_MR_IMAGE_STORAGE,
        image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
    )
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
    measures = Dataset()
    measures.PixelSpacing = [f"{v:g}" for v in grid.pixel_spacing]
    measures.SliceThickness = f"{grid.slice_gap:g}"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    order = [(v, k) for v in range(len(vols)) for k in range(grid.n_slices)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    frames, pixels = [], []
    for v_i, k in order:
        vol = vols[v_i]
        frame = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [f"{v:.4f}" for v in grid.position(k)]
        frame.PlanePositionSequence = DicomSequence([plane])
        diff = Dataset()
        if not (omit_b0_value and vol.b == 0):
            diff.DiffusionBValue = float(vol.b)
        if vol.direction is not None:
            diff.DiffusionDirectionality = "DIRECTIONAL"
            grad = Dataset()
            grad.DiffusionGradientOrientation = list(vol.direction)
            diff.DiffusionGradientDirectionSequence = DicomSequence([grad])
        else:
            diff.DiffusionDirectionality = "NONE" if vol.b == 0 else "ISOTROPIC"
        frame.MRDiffusionSequence = DicomSequence([diff])
        content = Dataset()
        content.StackID = stack_ids[k] if stack_ids else "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = v_i + 1
        frame.FrameContentSequence = DicomSequence([content])
        pvt = Dataset()
        pvt.RescaleSlope = f"{slope:g}"
        pvt.RescaleIntercept = "0"
        pvt.RescaleType = "US"
        frame.PixelValueTransformationSequence = DicomSequence([pvt])
        frames.append(frame)
        pixels.append(np.round(vol.signal[k] / slope).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    set_pixels(ds, np.stack(pixels), frames=len(frames))
    return ds


#: Attributes of a classic image that an Enhanced MR Image keeps per frame, not at top level.
_PER_IMAGE = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "TemporalPositionIdentifier",
    "InstanceNumber",
    "SliceLocation",
    "PixelData",
)


def as_enhanced(datasets: Sequence[Dataset], *, shuffle_seed: int | None = 5) -> Dataset:
    """The classic single-frame images of one series as ONE Enhanced MR Image (PS3.3 A.36).

    Position, orientation, pixel spacing, rescale and temporal position move into the
    functional groups (TemporalPositionIdentifier → FrameContent TemporalPositionIndex); the
    pixels are kept as stored. Frames are shuffled, as scanners need not write them in order.
    """
    first = datasets[0]
    ds = Dataset()
    for element in first:
        if element.keyword not in _PER_IMAGE:
            ds.add(element)
    ds.file_meta = FileMetaDataset(first.file_meta)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.get("SliceThickness", "1")
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    order = list(range(len(datasets)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    frames, pixels = [], []
    for i in order:
        image = datasets[i]
        frame = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = image.ImagePositionPatient
        frame.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.TemporalPositionIndex = int(image.get("TemporalPositionIdentifier", 1) or 1)
        frame.FrameContentSequence = DicomSequence([content])
        pvt = Dataset()
        pvt.RescaleSlope = image.get("RescaleSlope", "1")
        pvt.RescaleIntercept = image.get("RescaleIntercept", "0")
        pvt.RescaleType = "US"
        frame.PixelValueTransformationSequence = DicomSequence([pvt])
        frames.append(frame)
        pixels.append(image.pixel_array)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    set_pixels(ds, np.stack(pixels), frames=len(frames))
    return ds


def simple_image(
    *,
    series_uid: str | None = None,
    instance: int = 1,
    body_part: str | None = "BREAST",
    description: str = "",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    position: Vec3 = (0.0, 0.0, 0.0),
    modality: str = "MR",
) -> Dataset:
    """A plain 4x4 MR image for role tests (sequence parameters set by the caller)."""
    ds = base_dataset(
        study_uid=generate_uid(),
        series_uid=series_uid or generate_uid(),
        instance=instance,
        image_type=image_type,
        body_part=body_part,
        description=description,
    )
    ds.Modality = modality
    set_plane(ds, Grid(rows=4, cols=4), position)
    set_pixels(ds, np.full((4, 4), 100, np.uint16))
    return ds


# --------------------------------------------------------------------------- vendor conventions
# (tests/test_vendor_conventions.py; sources in docs/vendors.md)


def tag_toshiba_classic(ds: Dataset, vol: Vol) -> None:
    """Toshiba classic: (0018,9087)/(0018,9089) only where a gradient is applied; a b=0 image
    carries no diffusion attribute at all (no MR Diffusion Sequence either)."""
    if vol.b > 0:
        ds.DiffusionBValue = float(vol.b)
        if vol.direction is not None:
            ds.DiffusionGradientOrientation = list(vol.direction)


def tag_canon_comments(ds: Dataset, vol: Vol, *, b0_comment: bool = False) -> None:
    """Canon classic (post-Toshiba): b and gradient only in Image Comments (0020,4000) as
    ``b=1500(0.445,0.000,0.895)``; b=0 images have no comment unless ``b0_comment``."""
    if vol.b > 0 or b0_comment:
        x, y, z = vol.direction or (0.0, 0.0, 0.0)
        ds.ImageComments = f"b={round(vol.b)}({x:.3f},{y:.3f},{z:.3f})"


def strip_manufacturer(ds: Dataset, creator: str = "TOSHIBA_MEC_MR3") -> None:
    """De-identified export: Manufacturer blanked, a vendor private block (0x700D) kept."""
    ds.Manufacturer = ""
    ds.private_block(0x700D, creator, create=True).add_new(0x00, "DS", "1")


def uih_grid_without_plane(
    grid: Grid, vols: Sequence[Vol], *, orientation_in_vframes: bool = True
) -> list[Dataset]:
    """UIH VFRAME grid with no top-level ImagePositionPatient/ImageOrientationPatient: the
    per-slice positions (and, when ``orientation_in_vframes``, orientations) live only in the
    MR VFrame Sequence (0065,xx51) items (dcm2niix UIH/README.md)."""
    out = uih_grid_series(grid, vols)
    for ds in out:
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient
        if orientation_in_vframes:
            for item in ds.private_block(0x0065, "Image Private Header")[0x51].value:
                item.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
    return out


def to_bmatrix(ds: Dataset) -> Dataset:
    """Rewrite an :func:`enhanced_series` object's per-frame diffusion as a b-matrix
    (Directionality BMATRIX, Diffusion b-matrix Sequence (0018,9601), no (0018,9087)), the form
    Bruker ParaVision writes (PS3.3 C.8.13.5.9)."""
    for frame in ds.PerFrameFunctionalGroupsSequence:
        diff = frame.MRDiffusionSequence[0]
        b = float(diff.get("DiffusionBValue", 0.0))
        g = np.zeros(3)
        if "DiffusionGradientDirectionSequence" in diff:
            g = np.asarray(
                diff.DiffusionGradientDirectionSequence[0].DiffusionGradientOrientation, dtype=float
            )
            del diff.DiffusionGradientDirectionSequence
        if "DiffusionBValue" in diff:
            del diff.DiffusionBValue
        m = b * np.outer(g, g) if np.linalg.norm(g) > 0 else np.eye(3) * b / 3.0
        item = Dataset()
        item.DiffusionBValueXX, item.DiffusionBValueXY, item.DiffusionBValueXZ = (
            float(m[0, 0]),
            float(m[0, 1]),
            float(m[0, 2]),
        )
        item.DiffusionBValueYY, item.DiffusionBValueYZ, item.DiffusionBValueZZ = (
            float(m[1, 1]),
            float(m[1, 2]),
            float(m[2, 2]),
        )
        diff.DiffusionBMatrixSequence = DicomSequence([item])
        diff.DiffusionDirectionality = "BMATRIX"
    return ds
