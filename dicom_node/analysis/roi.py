"""The tumour region of interest on the DWI grid: from a DICOM SEG, or an automatic candidate.

A SEG (PS3.3 A.51) may be drawn on the DWI itself or on any other series sharing its
FrameOfReferenceUID (typically the DCE subtraction or T2). It is read with highdicom into a
patient-space volume and resampled onto the DWI grid by nearest neighbour on voxel centres: each
DWI voxel centre is mapped through the two affines (``Geometry.index_to_patient`` then the SEG's
inverse affine) and takes the value of the SEG voxel whose centre is nearest. This is exact for
a SEG drawn on the DWI itself; across grids it keeps the lesion's extent to within half a SEG
voxel and never interpolates labels.

Without a SEG an automatic candidate is proposed (hyperintense at high b, restricted diffusion,
inside the breast, largest 26-connected component) and marked unconfirmed: a radiologist must
confirm it before it is trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from dicom_node.analysis.adc import fit_adc
from dicom_node.analysis.noise import background_mask, estimate_sigma, otsu_threshold
from dicom_node.series.bvalues import bvalue_levels as group_bvals
from dicom_node.series.volume import Geometry
from models.contract import Laterality, RoiProvenance, RoiSource

__all__ = [
    "Laterality",
    "Roi",
    "RoiSource",
    "auto_roi",
    "largest_component",
    "laterality_of",
    "roi_from_seg",
    "seg_matches",
]


@dataclass(frozen=True)
class Roi:
    """A tumour ROI on the DWI grid with where it came from."""

    mask: NDArray[np.bool_]
    source: RoiSource
    confirmed: bool
    segment_label: str | None
    segment_number: int | None
    laterality: Laterality | None
    voxels: int
    volume_ml: float
    seg_series_uid: str | None
    #: Automatic candidate: the images it was grown on, and companion series left out (why).
    inputs: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    def provenance(self) -> RoiProvenance:
        """The ``roi`` object of the results API provenance."""
        return RoiProvenance(
            source=self.source,
            confirmed=self.confirmed,
            voxels=self.voxels,
            volume_ml=round(self.volume_ml, 4),
            seg_series_uid=self.seg_series_uid,
            inputs=self.inputs or None,
            inputs_ignored=self.ignored or None,
        )


def largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Largest 26-connected component of a boolean volume (empty in, empty out)."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def laterality_of(
    mask: NDArray[np.bool_], geometry: Geometry, *, midline_tolerance_mm: float = 5.0
) -> Laterality | None:
    """Side of the ROI from the patient-space x of its centroid (LPS: x > 0 is the left).

    Assumes the patient is centred on the scanner's x = 0 (as in breast coils); a centroid
    within ``midline_tolerance_mm`` of it, or an empty mask, gives ``None``.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    x = float(geometry.index_to_patient(idx.mean(axis=0))[0])
    if x > midline_tolerance_mm:
        return Laterality.LEFT
    if x < -midline_tolerance_mm:
        return Laterality.RIGHT
    return None


def _make_roi(
    mask: NDArray[np.bool_],
    geometry: Geometry,
    *,
    source: RoiSource,
    confirmed: bool,
    segment_label: str | None,
    segment_number: int | None,
    seg_series_uid: str | None,
    inputs: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> Roi:
    n = int(mask.sum())
    return Roi(
        mask=mask,
        source=source,
        confirmed=confirmed,
        segment_label=segment_label,
        segment_number=segment_number,
        laterality=laterality_of(mask, geometry),
        voxels=n,
        volume_ml=n * geometry.voxel_volume_mm3 / 1000.0,
        seg_series_uid=seg_series_uid,
        inputs=inputs,
        ignored=ignored,
    )


def _choose_segment(seg: hd.seg.Segmentation, segment: int | str | None) -> tuple[int, str]:
    described = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    if not described:
        raise ValueError("SEG has no segments")
    if segment is None:
        number = min(described)
    elif isinstance(segment, int):
        if segment not in described:
            raise ValueError(f"SEG has no segment {segment}; it has {sorted(described)}")
        number = segment
    else:
        hits = [k for k, v in described.items() if v == segment] or [
            k for k, v in described.items() if v.casefold() == segment.casefold()
        ]
        if not hits:
            raise ValueError(f"SEG has no segment labelled {segment!r}; labels {described}")
        number = min(hits)
    return number, described[number]


def seg_matches(seg: pydicom.Dataset, geometry: Geometry) -> bool:
    """Whether a SEG shares the DWI's frame of reference (so it can be resampled onto it)."""
    for_uid = str(getattr(seg, "FrameOfReferenceUID", ""))
    return not geometry.frame_of_reference_uid or for_uid == geometry.frame_of_reference_uid


def roi_from_seg(
    seg: pydicom.Dataset,
    geometry: Geometry,
    *,
    segment: int | str | None = None,
    confirmed: bool = True,
) -> Roi:
    """Resample one segment of a DICOM SEG onto the DWI grid (nearest neighbour, see module).

    ``segment`` picks a segment by number or label (default: the lowest-numbered). Raises
    ``ValueError`` if the SEG is not a segmentation, lies in another frame of reference, does
    not form a regular volume, or the segment does not overlap the DWI grid.
    """
    if not isinstance(seg, hd.seg.Segmentation):
        if getattr(seg, "Modality", None) != "SEG":
            raise ValueError("dataset is not a DICOM SEG (Modality != 'SEG')")
        seg = hd.seg.Segmentation.from_dataset(seg, copy=False)
    if not seg_matches(seg, geometry):
        raise ValueError(
            f"SEG FrameOfReferenceUID {seg.FrameOfReferenceUID} differs from the DWI's "
            f"{geometry.frame_of_reference_uid}: no spatial relation to resample by"
        )
    number, label = _choose_segment(seg, segment)
    try:
        vol = seg.get_volume(segment_numbers=[number], combine_segments=False)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"SEG frames do not form a regular volume: {exc}") from exc
    arr = np.asarray(vol.array)
    if arr.ndim == 4:
        arr = arr[..., 0]
    src = arr >= 0.5 if np.issubdtype(arr.dtype, np.floating) else arr > 0
    inv = np.asarray(vol.inverse_affine, dtype=np.float64)
    nz, ny, nx = geometry.shape
    ii, jj = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    mask = np.zeros(geometry.shape, dtype=bool)
    limits = np.array(src.shape)[:, None]
    for k in range(nz):  # one vectorised resample per DWI slice
        kij = np.stack([np.full(ii.size, k), ii.ravel(), jj.ravel()], axis=1)
        xyz = geometry.index_to_patient(kij)
        idx = np.rint(xyz @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64).T
        inside = np.all((idx >= 0) & (idx < limits), axis=0)
        hit = np.zeros(ii.size, dtype=bool)
        hit[inside] = src[idx[0, inside], idx[1, inside], idx[2, inside]]
        mask[k] = hit.reshape(ny, nx)
    if not mask.any():
        raise ValueError(f"SEG segment {number} ({label!r}) does not overlap the DWI grid")
    return _make_roi(
        mask,
        geometry,
        source=RoiSource.SEG,
        confirmed=confirmed,
        segment_label=label,
        segment_number=number,
        seg_series_uid=str(seg.SeriesInstanceUID),
    )


def auto_roi(
    data: ArrayLike,
    bvals: ArrayLike,
    geometry: Geometry,
    *,
    adc: NDArray[np.floating[Any]] | None = None,
    sigma: float | None = None,
    high_b: float = 1000.0,
    adc_max: float = 1.4e-3,
    z_threshold: float = 2.0,
    edge_erosion: int = 2,
    method: str = "grow",
    grow_fraction: float = 0.5,
    grow_adc_max: float = 1.7e-3,
    group_mm: float = 12.0,
    enhancement: NDArray[np.floating[Any]] | None = None,
    t2w: NDArray[np.floating[Any]] | None = None,
    enhance_fraction: float = 0.4,
    dce_adc_max: float = 1.9e-3,
    dce_hb_fraction: float = 0.3,
    fluid_t2_factor: float = 1.8,
    fluid_adc_min: float = 1.5e-3,
    ignored: Sequence[str] = (),
) -> Roi:
    """Automatic lesion candidate, marked unconfirmed.

    ``method="grow"`` (default): the legacy candidate below is only the seed. The lesion's own
    level is the median high-b signal of the seed; every breast voxel above ``grow_fraction`` of
    it (a half-maximum rule, never below the legacy noise floor median + 3·robust σ) with
    0 < ADC < ``grow_adc_max`` is eligible, and the candidate is the eligible components that
    touch the seed plus, for non-mass enhancement (clumped foci separated by normal tissue),
    those lying within ``group_mm`` of it (hysteresis growing with segmental grouping).
    ``method="legacy"`` is the earlier candidate, kept for comparison (benchmarks/bench_roi.py).

    What else the study holds, on the DWI grid (``analysis.companions.on_dwi_grid``):
    ``enhancement`` (the DCE subtraction) becomes the growing criterion — eligible voxels
    enhance above ``enhance_fraction`` of the lesion's level (90th percentile one voxel around
    the seed, so a rim counts), keep ADC < ``dce_adc_max`` and a high-b signal above
    ``dce_hb_fraction`` of the seed's — because kinetics, not the DWI half maximum, outline NME;
    it is not used (and ``ignored`` says so) when the seed itself does not enhance. ``t2w``
    excludes fluid (T2 above ``fluid_t2_factor`` × the seed's, ADC ≥ ``fluid_adc_min``).
    ``Roi.inputs`` names what was used, ``ignored`` what the caller left out and why; both stay
    empty when nothing but the DWI was offered (the provenance of DWI-only studies is unchanged).

    Legacy: within the breast (not background by the noise threshold, skin edge eroded by
    ``edge_erosion`` voxels in-plane), voxels on the b ≈ ``high_b`` image brighter than both
    Otsu's threshold of the breast and median + ``z_threshold``·(robust σ), and with
    0 < ADC < ``adc_max`` mm²/s (restricted diffusion), are kept; after an in-plane opening the
    largest 26-connected component is the candidate. An empty mask is
    returned when nothing qualifies.
    """
    if method not in ("grow", "legacy"):
        raise ValueError(f"unknown automatic ROI method {method!r} (grow or legacy)")
    arr = np.asarray(data)
    b = np.asarray(bvals, dtype=np.float64).ravel()
    levels, labels = group_bvals(b)
    if sigma is None:
        sigma = estimate_sigma(arr, bvals=b)
    breast = ~background_mask(arr, sigma, bvals=b)
    breast = ndimage.binary_fill_holes(breast)
    tissue = breast.copy()  # uneroded: fat-suppressed fat leaves holes erosion would widen
    if edge_erosion > 0:
        st = np.zeros((3, 3, 3), dtype=bool)
        st[1] = ndimage.generate_binary_structure(2, 1)
        breast = ndimage.binary_erosion(breast, structure=st, iterations=edge_erosion)
    positive = levels[levels > 0]
    if positive.size == 0:
        raise ValueError("automatic ROI needs a diffusion-weighted image (b > 0)")
    level = int(np.flatnonzero(levels == positive[np.argmin(np.abs(positive - high_b))])[0])
    hb = arr[..., labels == level].astype(np.float64).mean(axis=-1)
    if adc is None:
        try:
            adc = fit_adc(arr, b).adc
        except ValueError:
            adc = fit_adc(arr, b, adc_bvals=(float(levels[0]), float(levels[level]))).adc
    ref = hb[breast]
    mask = np.zeros(arr.shape[:-1], dtype=bool)
    used = ["dwi_high_b", "adc"]
    offered = enhancement is not None or t2w is not None
    if ref.size:
        med = float(np.median(ref))
        mad = 1.4826 * float(np.median(np.abs(ref - med)))
        threshold = max(otsu_threshold(ref), med + z_threshold * max(mad, 1e-12))
        cand = breast & (hb > threshold) & (adc > 0) & (adc < adc_max)
        st2 = np.zeros((3, 3, 3), dtype=bool)
        st2[1] = ndimage.generate_binary_structure(2, 1)
        opened = ndimage.binary_opening(cand, structure=st2)
        mask = largest_component(opened if opened.any() else cand)
        if method == "grow" and mask.any():
            allowed = tissue
            if t2w is not None:
                fluid = _fluid(t2w, adc, mask, factor=fluid_t2_factor, adc_min=fluid_adc_min)
                allowed = tissue & ~fluid
                used.append("t2w")
            eligible = None
            if enhancement is not None:
                eligible = _enhancing(enhancement, mask, breast, fraction=enhance_fraction)
                if eligible is None:
                    ignored = (*ignored, "dce_subtraction: the DWI candidate does not enhance")
                else:
                    # the lesion's DWI level loosened: DCE, not the half maximum, sets the edge
                    hb_level = float(np.median(hb[mask]))
                    eligible &= (hb > dce_hb_fraction * hb_level) & (adc > 0) & (adc < dce_adc_max)
                    used.append("dce_subtraction")
            mask = _grow(
                mask,
                hb,
                adc,
                allowed,
                geometry,
                floor=med + 3.0 * mad,
                fraction=grow_fraction,
                adc_max=grow_adc_max,
                group_mm=group_mm,
                eligible=eligible,
            )

    return _make_roi(
        mask,
        geometry,
        source=RoiSource.AUTO,
        confirmed=False,
        segment_label="automatic candidate",
        segment_number=None,
        seg_series_uid=None,
        # recorded when the study offered more than the DWI (absent: the DWI alone, as before)
        inputs=tuple(used) if offered or ignored else (),
        ignored=tuple(ignored),
    )


_LEVEL_DILATION = 1
_LEVEL_PERCENTILE = 90.0


def _enhancing(
    enhancement: NDArray[np.floating[Any]],
    seed: NDArray[np.bool_],
    breast: NDArray[np.bool_],
    *,
    fraction: float,
) -> NDArray[np.bool_] | None:
    """Voxels enhancing like the lesion: above ``fraction`` of the seed's median subtraction
    signal. None when the seed itself does not enhance above the breast's median + 3·robust σ
    (the DCE does not confirm the DWI candidate, so it gives no level to grow on)."""
    e = np.asarray(enhancement, dtype=np.float64)
    ref = e[breast]
    if ref.size == 0 or not seed.any():
        return None
    med = float(np.median(ref))
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    if float(np.median(e[seed])) <= med + 3.0 * max(mad, 1e-12):
        return None
    # The lesion's enhancement level: a rim-enhancing mass is brightest at its margin, which the
    # DWI seed (its cellular core) may not reach, so the level is taken one voxel around it.
    near = ndimage.binary_dilation(seed, iterations=_LEVEL_DILATION) & breast
    level = float(np.percentile(e[near | seed], _LEVEL_PERCENTILE))
    return np.asarray(e > fraction * level)


def _fluid(
    t2w: NDArray[np.floating[Any]],
    adc: NDArray[np.floating[Any]],
    seed: NDArray[np.bool_],
    *,
    factor: float,
    adc_min: float,
) -> NDArray[np.bool_]:
    """Cysts and fluid: T2 brighter than ``factor`` × the seed's median T2 with free diffusion
    (ADC ≥ ``adc_min``). Why: fluid is bright on b ≈ 0–800 images and can touch a lesion; the T2w
    series tells fluid from cellular tissue."""
    t2 = np.asarray(t2w, dtype=np.float64)
    level = float(np.median(t2[seed])) if seed.any() else 0.0
    if level <= 0:
        return np.zeros(t2.shape, dtype=bool)
    return np.asarray((t2 > factor * level) & (adc >= adc_min))


def _grow(
    seed: NDArray[np.bool_],
    hb: NDArray[np.float64],
    adc: NDArray[np.floating[Any]],
    breast: NDArray[np.bool_],
    geometry: Geometry,
    *,
    floor: float,
    fraction: float,
    adc_max: float,
    group_mm: float,
    eligible: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """Hysteresis growing from ``seed`` with grouping of nearby foci (see :func:`auto_roi`).

    Why: the strict seed threshold keeps only a lesion's brightest core (under-segmenting a
    mass) and only one focus of clumped non-mass enhancement; the half-maximum of the lesion's
    own signal is the boundary that does not depend on how bright the lesion is.
    """
    if eligible is None:
        level = float(np.median(hb[seed]))
        low = max(fraction * level, floor)
        eligible = breast & (hb > low) & (adc > 0) & (adc < adc_max)
    else:  # DCE given: enhancement (with restricted-enough diffusion) decides, within the breast
        eligible = eligible & breast
    eligible = eligible | (seed & breast) | seed
    structure = np.ones((3, 3, 3), dtype=bool)
    lab, n = ndimage.label(eligible, structure=structure)
    if n == 0:
        return seed
    core = np.unique(lab[seed])
    grown = np.isin(lab, core[core > 0])
    if group_mm > 0:
        spacing = (geometry.slice_spacing, geometry.row_spacing, geometry.col_spacing)
        dist = ndimage.distance_transform_edt(~grown, sampling=spacing)
        near = np.unique(lab[(dist <= group_mm) & eligible])
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = [int(k) for k in near if k > 0 and sizes[k] >= 3]
        grown |= np.isin(lab, keep)
    return np.asarray(grown)
