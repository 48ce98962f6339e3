"""The study's other images for the automatic ROI: T2-weighted and DCE subtraction on the DWI grid.

Radiologists delineate a lesion on every series the study holds: kinetics (the DCE subtraction)
are how non-mass enhancement is outlined, the T2-weighted series tells fluid from tissue. A
companion series is used only when it can be placed on the DWI grid honestly:

- same FrameOfReferenceUID as the DWI (else there is no spatial relation at all);
- a regular stack (one orientation, matrix and pixel spacing; evenly spaced slices) covering at
  least ``min_coverage`` of the DWI's tissue;
- registered: resampled onto the DWI grid by patient coordinates (trilinear,
  ``scipy.ndimage.map_coordinates``), its normalised mutual information with the DWI b ≈ 0
  image must peak at zero displacement — a series shifted by patient motion or a wrong header
  matches better when moved by a few voxels (NMI: Studholme et al., Pattern Recognit 1999).

Everything left out is named with its reason (``provenance.roi.inputs_ignored``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_node.series.assemble import PixelCache
from dicom_node.series.frames import FrameRef, expand_frames, stated_pixel_spacing
from dicom_node.series.headers import text
from dicom_node.series.roles import frame_types
from dicom_node.series.volume import DwiVolume, Geometry, ScalarVolume

__all__ = [
    "CompanionKind",
    "CompanionSeries",
    "OnDwiGrid",
    "companion_from_datasets",
    "nmi_peak_at_zero",
    "on_dwi_grid",
    "resample_linear",
    "stack_volume",
]


class CompanionKind(StrEnum):
    """What a companion series contributes to the automatic ROI."""

    T2W = "t2w"
    DCE_SUBTRACTION = "dce_subtraction"


@dataclass(frozen=True)
class CompanionSeries:
    """One companion volume (a DCE subtraction may be computed from a pre/post pair)."""

    kind: CompanionKind
    volume: ScalarVolume
    #: True for a subtraction computed here from a dynamic series' pre- and post-contrast phases
    #: (a stored subtraction is preferred to it).
    computed: bool = False

    @property
    def stored_subtraction(self) -> bool:
        """A subtraction series the scanner stored (Image or Frame Type SUBTRACTION)."""
        return self.kind is CompanionKind.DCE_SUBTRACTION and not self.computed

    @property
    def label(self) -> str:
        return f"{self.kind.value} {self.volume.series_instance_uid}".strip()


@dataclass(frozen=True)
class OnDwiGrid:
    """Companions resampled onto the DWI grid, and those left out (each with why)."""

    t2w: NDArray[np.float64] | None = None
    enhancement: NDArray[np.float64] | None = None
    ignored: tuple[str, ...] = ()


def stack_volume(datasets: Sequence[Dataset], *, series_instance_uid: str = "") -> ScalarVolume:
    """A 3-D volume from the images of one series: classic single-frame images, or the frames
    of enhanced multi-frame objects (placed by their functional groups), one position each.

    Raises ``ValueError`` (the message says what is wrong) when the images do not form a regular
    stack: missing geometry, mixed orientation, matrix or spacing, repeated or uneven positions.
    """
    return _stack(datasets, _placed(datasets), series_instance_uid, PixelCache(datasets))


def _placed(datasets: Sequence[Dataset]) -> list[FrameRef]:
    """Every image of ``datasets`` with its place, or ``ValueError`` when one has none."""
    if not datasets:
        raise ValueError("no images")
    frames = expand_frames(datasets)
    stored = sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in datasets)
    if len(frames) < stored or not all(
        stated_pixel_spacing(datasets[f.dataset_index], f) for f in frames
    ):
        raise ValueError(
            "images lack ImagePositionPatient/ImageOrientationPatient/PixelSpacing "
            "(or their functional groups)"
        )
    return frames


def _stack(
    datasets: Sequence[Dataset],
    frames: Sequence[FrameRef],
    series_instance_uid: str,
    pixels: PixelCache,
) -> ScalarVolume:
    """The regular stack ``frames`` (placed images of ``datasets``) form, else ``ValueError``.

    ``pixels`` decodes each dataset once, also across the phases of one enhanced object."""
    first = frames[0]
    iop0 = np.asarray(first.orientation, dtype=np.float64)
    ps0 = np.asarray(first.pixel_spacing, dtype=np.float64)
    matrix0 = (first.rows, first.columns)
    for f in frames[1:]:
        if not np.allclose(f.orientation, iop0, atol=1e-3) or not np.allclose(
            f.pixel_spacing, ps0, atol=1e-3
        ):
            raise ValueError("images differ in orientation or pixel spacing")
        if (f.rows, f.columns) != matrix0:
            raise ValueError("images differ in matrix")
    normal = np.cross(iop0[:3], iop0[3:])
    normal /= np.linalg.norm(normal)
    where = np.array([float(np.asarray(f.position) @ normal) for f in frames])
    order = np.argsort(where)
    gaps = np.diff(where[order])
    if gaps.size and (gaps.min() < 1e-3):
        raise ValueError("two images share one position (several phases or repeats)")
    head = datasets[first.dataset_index]
    thickness = float(head.get("SliceThickness", 1.0) or 1.0)
    spacing = float(np.median(gaps)) if gaps.size else thickness
    if gaps.size and np.max(np.abs(gaps - spacing)) > 0.1 * spacing:
        raise ValueError("slices are not evenly spaced")
    data = np.stack([pixels.frame(frames[int(i)]) for i in order])
    lowest = frames[int(order[0])]
    geometry = Geometry(
        shape=(int(data.shape[0]), matrix0[0], matrix0[1]),
        origin=tuple(float(v) for v in lowest.position),  # type: ignore[arg-type]
        row_dir=tuple(float(v) for v in iop0[:3]),  # type: ignore[arg-type]
        col_dir=tuple(float(v) for v in iop0[3:]),  # type: ignore[arg-type]
        row_spacing=float(ps0[0]),
        col_spacing=float(ps0[1]),
        slice_spacing=spacing,
        frame_of_reference_uid=text(datasets[lowest.dataset_index], "FrameOfReferenceUID"),
    )
    return ScalarVolume(
        data=data,
        geometry=geometry,
        series_instance_uid=series_instance_uid or text(head, "SeriesInstanceUID"),
    )


def _phase_key(ds: Dataset, frame: FrameRef) -> str:
    """The temporal position of one image: FrameContentSequence's TemporalPositionIndex in an
    enhanced object, else TemporalPositionIdentifier, AcquisitionNumber or TriggerTime."""
    if frame.frame_index is not None:
        item = ds.PerFrameFunctionalGroupsSequence[frame.frame_index]
        for content in item.get("FrameContentSequence") or []:
            value = text(content, "TemporalPositionIndex")
            if value:
                return value
    for keyword in ("TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime"):
        value = text(ds, keyword)
        if value:
            return value
    return ""


def companion_from_datasets(role: str, datasets: Sequence[Dataset]) -> CompanionSeries:
    """The companion a series classified ``role`` (``t2w`` or ``dce``) gives.

    A DCE series whose Image Type (or Frame Type) says SUBTRACTION is the subtraction; a dynamic
    series (several temporal positions, in separate images or in the frames of one enhanced
    object) gives first post-contrast − pre-contrast (the first two phases, by
    TemporalPositionIndex or TemporalPositionIdentifier, else AcquisitionNumber or TriggerTime).
    Raises ``ValueError``.
    """
    uid = text(datasets[0], "SeriesInstanceUID") if datasets else ""
    if role == "t2w":
        return CompanionSeries(CompanionKind.T2W, stack_volume(datasets))
    if role != "dce":
        raise ValueError(f"a {role or 'unclassified'} series is not used by the automatic ROI")
    if "SUBTRACTION" in frame_types(datasets[0]):
        return CompanionSeries(CompanionKind.DCE_SUBTRACTION, stack_volume(datasets))
    phases: dict[str, list[FrameRef]] = {}
    for frame in _placed(datasets):
        phases.setdefault(_phase_key(datasets[frame.dataset_index], frame), []).append(frame)
    keys = sorted(phases, key=lambda k: float(k) if k.replace(".", "", 1).isdigit() else 0.0)
    if len(keys) < 2:
        raise ValueError("a dynamic series needs a pre- and a post-contrast phase")
    pixels = PixelCache(datasets)
    pre = _stack(datasets, phases[keys[0]], uid, pixels)
    post = _stack(datasets, phases[keys[1]], uid, pixels)
    if pre.geometry != post.geometry:
        raise ValueError("pre- and post-contrast phases differ in geometry")
    sub = np.clip(np.asarray(post.data) - np.asarray(pre.data), 0.0, None)
    return CompanionSeries(
        CompanionKind.DCE_SUBTRACTION,
        ScalarVolume(data=sub, geometry=pre.geometry, series_instance_uid=uid),
        computed=True,
    )


def resample_linear(
    values: NDArray[np.floating], source: Geometry, target: Geometry, *, cval: float = 0.0
) -> NDArray[np.float64]:
    """``values`` on ``source`` sampled (trilinear) at the voxel centres of ``target``, through
    patient coordinates; ``cval`` outside the source grid."""
    k, i, j = np.meshgrid(*(np.arange(n, dtype=float) for n in target.shape), indexing="ij")
    idx = source.patient_to_index(target.index_to_patient(np.stack([k, i, j], axis=-1)))
    return np.asarray(
        ndimage.map_coordinates(
            np.asarray(values, dtype=np.float64),
            np.moveaxis(idx, -1, 0),
            order=1,
            mode="constant",
            cval=cval,
        )
    )


def _nmi(a: NDArray[np.float64], b: NDArray[np.float64], bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B): 1 = independent, 2 = identical."""
    h, _, _ = np.histogram2d(a, b, bins=bins)
    p = h / max(h.sum(), 1.0)

    def entropy(q: NDArray[np.float64]) -> float:
        q = q[q > 0]
        return float(-np.sum(q * np.log(q)))

    joint = entropy(p)
    return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / joint if joint > 0 else 1.0


def nmi_peak_at_zero(
    fixed: NDArray[np.float64],
    moving: NDArray[np.float64],
    region: NDArray[np.bool_],
    *,
    shift_voxels: tuple[int, int, int] = (1, 2, 2),
) -> tuple[bool, str]:
    """Whether ``moving`` matches ``fixed`` (same grid) best where it is, not shifted.

    Tries a displacement of ± ``shift_voxels`` along each axis (slice, row, column); registered
    means none of them raises the NMI over ``region``. Returns the verdict and a short reason.
    """
    zero = _nmi(fixed[region], moving[region])
    for axis, step in enumerate(shift_voxels):
        if step <= 0 or fixed.shape[axis] <= 2 * step:
            continue
        for s in (-step, step):
            shifted = _nmi(fixed[region], np.roll(moving, s, axis=axis)[region])
            if shifted > zero:
                names = ("slice", "row", "column")
                return False, (
                    f"misregistered: matches the DWI better moved {s:+d} {names[axis]}s "
                    f"(NMI {shifted:.3f} > {zero:.3f})"
                )
    return True, f"registered (NMI {zero:.3f})"


def on_dwi_grid(
    companions: Sequence[CompanionSeries],
    dwi: DwiVolume,
    tissue: NDArray[np.bool_],
    *,
    min_coverage: float = 0.9,
) -> OnDwiGrid:
    """Resample each usable companion onto the DWI grid (first usable one per kind).

    ``tissue`` is the DWI's non-background mask: coverage is measured on it and the registration
    check runs over it (dilated, so the skin edge counts). Rejected companions are listed in
    ``ignored`` as ``"<kind> <series uid>: <reason>"``.
    """
    geometry = dwi.geometry
    fixed = np.asarray(dwi.data[..., int(np.argmin(dwi.bvals))], dtype=np.float64)
    region = ndimage.binary_dilation(tissue, iterations=3)
    found: dict[CompanionKind, NDArray[np.float64]] = {}
    ignored: list[str] = []
    for comp in companions:
        vol = comp.volume
        if comp.kind in found:
            ignored.append(f"{comp.label}: another {comp.kind.value} series is used")
            continue
        for_uid = vol.geometry.frame_of_reference_uid
        if geometry.frame_of_reference_uid and for_uid != geometry.frame_of_reference_uid:
            ignored.append(f"{comp.label}: other frame of reference, no spatial relation")
            continue
        moved = resample_linear(vol.data, vol.geometry, geometry, cval=np.nan)
        outside = ~np.isfinite(moved)
        coverage = 1.0 - float(outside[tissue].mean()) if tissue.any() else 0.0
        if coverage < min_coverage:
            ignored.append(f"{comp.label}: covers {coverage:.0%} of the DWI's tissue")
            continue
        moved[outside] = 0.0
        ok, why = nmi_peak_at_zero(fixed, moved, region & ~outside)
        if not ok:
            ignored.append(f"{comp.label}: {why}")
            continue
        found[comp.kind] = moved
    return OnDwiGrid(
        t2w=found.get(CompanionKind.T2W),
        enhancement=found.get(CompanionKind.DCE_SUBTRACTION),
        ignored=tuple(ignored),
    )
