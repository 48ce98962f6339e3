"""Tumour ROI: from DICOM SEG on the DWI grid or another grid of the same frame of reference,
segment choice, laterality, and the automatic unconfirmed candidate."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import (
    BVALS,
    Tissue,
    axial_geometry,
    make_phantom,
    make_seg,
    mr_series,
    sphere_mask,
)

from dicom_node.analysis.roi import (
    Laterality,
    RoiSource,
    auto_roi,
    laterality_of,
    roi_from_seg,
)
from dicom_node.series.volume import Geometry


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture
def dwi_geometry() -> Geometry:
    return axial_geometry(
        (10, 48, 48), spacing=(4.0, 2.0, 2.0), frame_of_reference_uid=generate_uid()
    )


def test_seg_on_dwi_grid_round_trips_through_a_file(dwi_geometry: Geometry, tmp_path: Path) -> None:
    truth = sphere_mask(dwi_geometry, (20.0, -6.0, 2.0), 9.0)
    seg = make_seg(mr_series(dwi_geometry), truth)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    roi = roi_from_seg(pydicom.dcmread(path), dwi_geometry)
    np.testing.assert_array_equal(roi.mask, truth)
    assert roi.source is RoiSource.SEG and roi.confirmed
    assert roi.segment_label == "tumour" and roi.segment_number == 1
    assert roi.voxels == int(truth.sum())
    assert roi.volume_ml == pytest.approx(truth.sum() * 16.0 / 1000.0)
    assert roi.seg_series_uid == seg.SeriesInstanceUID
    assert roi.laterality is Laterality.LEFT
    assert roi.provenance().source is RoiSource.SEG


def test_seg_drawn_on_another_grid_of_the_same_frame(dwi_geometry: Geometry) -> None:
    """A SEG on a finer, shifted grid (e.g. DCE) is resampled onto the DWI by geometry."""
    centre, radius = (-22.0, 4.0, -3.0), 10.0
    fine = axial_geometry(
        (30, 100, 90),
        spacing=(1.5, 0.9, 0.9),
        centre=(1.3, -0.7, 0.4),
        frame_of_reference_uid=dwi_geometry.frame_of_reference_uid,
    )
    seg = make_seg(mr_series(fine), sphere_mask(fine, centre, radius))
    roi = roi_from_seg(seg, dwi_geometry)
    expected = sphere_mask(dwi_geometry, centre, radius)
    assert _dice(roi.mask, expected) > 0.85
    got = dwi_geometry.index_to_patient(np.argwhere(roi.mask).mean(axis=0))
    assert np.linalg.norm(got - np.asarray(centre)) < 1.5  # mm
    assert roi.laterality is Laterality.RIGHT


def test_segment_choice(dwi_geometry: Geometry) -> None:
    a = sphere_mask(dwi_geometry, (20.0, 0.0, 0.0), 7.0)
    b = sphere_mask(dwi_geometry, (-20.0, 0.0, 0.0), 5.0)
    seg = make_seg(mr_series(dwi_geometry), np.stack([a, b], -1), labels=("index", "satellite"))
    np.testing.assert_array_equal(roi_from_seg(seg, dwi_geometry).mask, a)  # default: first
    np.testing.assert_array_equal(roi_from_seg(seg, dwi_geometry, segment=2).mask, b)
    by_label = roi_from_seg(seg, dwi_geometry, segment="satellite")
    np.testing.assert_array_equal(by_label.mask, b)
    assert by_label.segment_number == 2 and by_label.laterality is Laterality.RIGHT
    with pytest.raises(ValueError, match="no segment 3"):
        roi_from_seg(seg, dwi_geometry, segment=3)
    with pytest.raises(ValueError, match="labelled"):
        roi_from_seg(seg, dwi_geometry, segment="nodule")


def test_seg_in_another_frame_of_reference_is_refused(dwi_geometry: Geometry) -> None:
    other = axial_geometry(dwi_geometry.shape, frame_of_reference_uid=generate_uid())
    seg = make_seg(mr_series(other), sphere_mask(other, (20.0, 0.0, 0.0), 6.0))
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        roi_from_seg(seg, dwi_geometry)


def test_seg_outside_the_dwi_volume_is_refused(dwi_geometry: Geometry) -> None:
    far = axial_geometry(
        (4, 20, 20), centre=(0.0, 0.0, 300.0),
        frame_of_reference_uid=dwi_geometry.frame_of_reference_uid,
    )  # fmt: skip
    seg = make_seg(mr_series(far), sphere_mask(far, (0.0, 0.0, 300.0), 6.0))
    with pytest.raises(ValueError, match="does not overlap"):
        roi_from_seg(seg, dwi_geometry)


def test_not_a_seg_is_refused(dwi_geometry: Geometry) -> None:
    with pytest.raises(ValueError, match="not a DICOM SEG"):
        roi_from_seg(mr_series(dwi_geometry)[0], dwi_geometry)


def test_laterality_uses_patient_x(dwi_geometry: Geometry) -> None:
    left = sphere_mask(dwi_geometry, (30.0, 0.0, 0.0), 4.0)
    right = sphere_mask(dwi_geometry, (-30.0, 0.0, 0.0), 4.0)
    mid = sphere_mask(dwi_geometry, (0.0, 0.0, 0.0), 4.0)
    assert laterality_of(left, dwi_geometry) is Laterality.LEFT
    assert laterality_of(right, dwi_geometry) is Laterality.RIGHT
    assert laterality_of(mid, dwi_geometry) is None
    assert laterality_of(np.zeros(dwi_geometry.shape, bool), dwi_geometry) is None


@pytest.mark.parametrize("side", ["L", "R"])
def test_auto_roi_finds_planted_lesion(side: str) -> None:
    ph = make_phantom((8, 64, 64), snr=30, seed=21, lesion_side=side)
    geom = axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid())
    roi = auto_roi(ph.signal, BVALS, geom)
    truth = ph.tissue == Tissue.TUMOUR
    assert roi.source is RoiSource.AUTO
    assert roi.confirmed is False
    assert roi.seg_series_uid is None
    assert _dice(roi.mask, truth) > 0.7
    assert roi.laterality is Laterality(side)


def test_auto_roi_empty_when_no_lesion() -> None:
    ph = make_phantom((6, 48, 48), snr=30, seed=2, lesion_radius_frac=0.0)
    geom = axial_geometry(ph.tissue.shape)
    roi = auto_roi(ph.signal, BVALS, geom)
    assert roi.voxels < 10  # at most a noise speck, never the breast
