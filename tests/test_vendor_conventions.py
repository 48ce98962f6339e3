"""Vendor diffusion conventions dcm2niix documents, each on a synthetic series (docs/vendors.md).

Every test builds the documented tags (tests/dicom_builders.py), runs the node's own analysis
(classification, layout, assembly, ``inspect``) and checks the b-values, volumes and slices
dcm2niix would report, or the exact message naming what is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_builders import (
    Grid,
    classic_series,
    enhanced_series,
    siemens_mosaic_series,
    strip_manufacturer,
    tag_canon_comments,
    tag_ge,
    tag_siemens,
    tag_standard,
    tag_toshiba_classic,
    to_bmatrix,
    uih_grid_series,
    uih_grid_without_plane,
    volumes,
    write,
)
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.series.assemble import AssemblyError, assemble_dwi
from dicom_node.series.bvalues import BValueSource, diffusion_info
from dicom_node.series.dicomio import read_datasets
from dicom_node.series.frames import StorageStyle
from dicom_node.series.inspection import inspect_paths, inspect_series
from dicom_node.series.layout import ProblemKind, plan_layout
from dicom_node.series.roles import SeriesRole, classify_series
from dicom_node.series.vendors import VendorFamily, canon_comment_diffusion, vendor_family

GRID = Grid(n_slices=4)
DIRS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
#: The reported Toshiba DTI export in miniature: one b=0 volume, twelve b=1500 directions.
TWELVE = [
    tuple(np.round(v / np.linalg.norm(v), 4)) for v in np.random.default_rng(5).normal(size=(12, 3))
]


def _bvals(datasets: list[Dataset]) -> list[float]:
    return [float(v.b) if v.b is not None else float("nan") for v in plan_layout(datasets).volumes]


# --------------------------------------------------------------------------- Toshiba / Canon


@pytest.mark.parametrize(
    "manufacturer", ["TOSHIBA", "Toshiba Medical Systems", "CANON_MEC", "Canon Medical Systems"]
)
def test_toshiba_classic_b0_without_any_diffusion_tag(manufacturer: str) -> None:
    vols = volumes(GRID, [(0.0, [None]), (1500.0, TWELVE)])
    datasets = classic_series(GRID, vols, tag_toshiba_classic, manufacturer=manufacturer)
    b0_images = [ds for ds in datasets if "DiffusionBValue" not in ds]
    assert len(b0_images) == GRID.n_slices
    assert not any("MRDiffusionSequence" in ds for ds in datasets)
    layout = plan_layout(datasets)
    assert layout.problems == [] and layout.frames_without_b == 0
    assert sorted(_bvals(datasets)) == [0.0] + [1500.0] * 12
    b0 = [f.diffusion for f in layout.frames if f.diffusion.b == 0.0]
    assert {d.source for d in b0} == {BValueSource.IMPLIED_B0_SERIES}
    entry = inspect_series(datasets)
    assert entry["volumes_per_b"] == {"0": 1, "1500": 12}
    assert entry["role"] == SeriesRole.DWI_DIRECTIONAL.value
    assert entry["vendor_family"] == VendorFamily.CANON.value
    assert not any("carry no b-value" in p for p in entry["problems"])


def test_toshiba_rule_found_through_private_creator_when_manufacturer_blank() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1500.0, DIRS)])
    datasets = classic_series(GRID, vols, tag_toshiba_classic, manufacturer="TOSHIBA")
    for ds in datasets:
        strip_manufacturer(ds)
    assert vendor_family(datasets[0]) is VendorFamily.CANON
    assert sorted(_bvals(datasets)) == [0.0, 1500.0, 1500.0, 1500.0]


def test_canon_enhanced_b0_frames_without_diffusion_sequence() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1500.0, DIRS)])
    ds = enhanced_series(GRID, vols, manufacturer="CANON_MEC")
    for frame in ds.PerFrameFunctionalGroupsSequence:
        if float(frame.MRDiffusionSequence[0].get("DiffusionBValue", 0.0)) == 0.0:
            del frame.MRDiffusionSequence
    dwi = assemble_dwi([ds])
    np.testing.assert_array_equal(dwi.bvals, [0.0, 1500.0])
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)


def test_canon_classic_image_comments_give_b_and_gradient() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1500.0, DIRS)])
    datasets = classic_series(GRID, vols, tag_canon_comments, manufacturer="CANON_MEC")
    one = next(ds for ds in datasets if "ImageComments" in ds)
    assert canon_comment_diffusion(one) is not None
    info = diffusion_info(one)
    assert info.b == 1500.0 and info.source is BValueSource.CANON_COMMENTS
    assert info.direction in DIRS
    c = classify_series(datasets)
    assert c.role is SeriesRole.DWI_DIRECTIONAL, c.reasons
    dwi = assemble_dwi(datasets)
    np.testing.assert_array_equal(dwi.bvals, [0.0, 1500.0])


def test_canon_comment_for_b0_read_as_b0() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, [DIRS[0]])])
    datasets = classic_series(
        GRID, vols, lambda ds, v: tag_canon_comments(ds, v, b0_comment=True), manufacturer="TOSHIBA"
    )
    layout = plan_layout(datasets)
    assert {f.diffusion.source for f in layout.frames} == {BValueSource.CANON_COMMENTS}
    assert sorted(_bvals(datasets)) == [0.0, 1000.0]


def test_image_comments_of_other_vendors_are_not_b_values() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, [DIRS[0]])])
    datasets = classic_series(GRID, vols, tag_canon_comments, manufacturer="SIEMENS")
    assert canon_comment_diffusion(datasets[0]) is None
    assert plan_layout(datasets).frames_without_b == len(datasets)


def test_missing_b_not_implied_for_other_families() -> None:
    """GE also omits (0018,9087) on b=0, but keeps (0043,xx39): without it b stays unknown."""
    vols = volumes(GRID, [(0.0, [None]), (1000.0, [None])])
    datasets = classic_series(GRID, vols, tag_toshiba_classic, manufacturer="GE MEDICAL SYSTEMS")
    layout = plan_layout(datasets)
    assert layout.frames_without_b == GRID.n_slices
    entry = inspect_series(datasets)
    (missing,) = [p for p in entry["problems"] if "carry no b-value" in p]
    assert f"{GRID.n_slices} of {2 * GRID.n_slices} images" in missing
    assert "(0043,xx39)" in missing and "vendor family GE" in missing
    with pytest.raises(AssemblyError) as info:
        assemble_dwi(datasets)
    assert ProblemKind.MISSING_B_VALUES in info.value.kinds


def test_ge_b0_with_private_b_only_still_b0() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, DIRS)])
    datasets = classic_series(GRID, vols, tag_ge, manufacturer="GE MEDICAL SYSTEMS")
    assert sorted(_bvals(datasets)) == [0.0, 1000.0, 1000.0, 1000.0]


# --------------------------------------------------------------------------- UIH


def test_uih_grid_placed_from_vframe_sequence() -> None:
    grid = Grid(n_slices=5)
    vols = volumes(grid, [(1.25, [None]), (929.75, [None])])
    datasets = uih_grid_without_plane(grid, vols)
    assert all("ImagePositionPatient" not in ds for ds in datasets)
    layout = plan_layout(datasets)
    assert layout.problems == []
    assert layout.storage is StorageStyle.MOSAIC
    assert len(layout.slice_positions) == grid.n_slices
    entry = inspect_series(datasets)
    assert entry["role"] == SeriesRole.DWI_TRACE.value, entry["reasons"]
    assert entry["storage"] == "mosaic" and entry["slices"] == grid.n_slices
    assert entry["vendor_family"] == VendorFamily.UIH.value
    dwi = assemble_dwi(datasets)
    np.testing.assert_allclose(dwi.bvals, [1.25, 929.75])
    np.testing.assert_allclose(dwi.data[..., 1], vols[1].signal, rtol=1e-6)
    assert dwi.geometry.origin == pytest.approx(grid.position(0), abs=1e-3)


def test_uih_grid_vframe_positions_agree_with_top_level_plane() -> None:
    grid = Grid(n_slices=5)
    vols = volumes(grid, [(0.0, [None]), (1000.0, [None])])
    with_plane = plan_layout(uih_grid_series(grid, vols))
    without = plan_layout(uih_grid_without_plane(grid, vols))
    np.testing.assert_allclose(without.slice_positions, with_plane.slice_positions, atol=1e-3)


def test_uih_grid_without_orientation_anywhere_names_the_tag() -> None:
    grid = Grid(n_slices=5)
    vols = volumes(grid, [(0.0, [None]), (1000.0, [None])])
    datasets = uih_grid_without_plane(grid, vols, orientation_in_vframes=False)
    entry = inspect_series(datasets)
    # Still recognised as diffusion from (0065,xx09), not mistaken for a T2-weighted series.
    assert entry["role"] == SeriesRole.DWI_TRACE.value, entry["reasons"]
    (placed,) = [p for p in entry["problems"] if "cannot be placed" in p]
    assert (
        "ImageOrientationPatient (0020,0037) missing on 2 of 2 images and no UIH MR VFrame "
        "Sequence (0065,xx51) value"
    ) in placed
    assert "ImagePositionPatient" not in placed  # positions were found in the VFrame items


def test_classic_image_without_position_names_tag_and_count() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    datasets = classic_series(GRID, vols, tag_standard)
    for ds in datasets:
        del ds.ImagePositionPatient
    layout = plan_layout(datasets)
    n = len(datasets)
    (problem,) = [p for p in layout.problems if p.kind is ProblemKind.INCONSISTENT_GEOMETRY]
    assert (
        f"ImagePositionPatient (0020,0032) missing on {n} of {n} images and no UIH MR "
        "VFrame Sequence (0065,xx51) value"
    ) in problem.message
    assert classify_series(datasets).role is SeriesRole.DWI_TRACE


def test_enhanced_frames_without_plane_position_named() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    ds = enhanced_series(GRID, vols)
    del ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    message = " ".join(p.message for p in plan_layout([ds]).problems)
    n = len(ds.PerFrameFunctionalGroupsSequence)
    assert (
        f"Plane Position Sequence (0020,9113) > ImagePositionPatient missing on 1 of {n}" in message
    )


# --------------------------------------------------------------------------- Bruker b-matrix


def test_bruker_bmatrix_gives_b_and_direction() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, DIRS)])
    ds = to_bmatrix(enhanced_series(GRID, vols, manufacturer="Bruker BioSpin MRI GmbH"))
    layout = plan_layout([ds])
    assert layout.problems == [] and layout.frames_without_b == 0
    infos = [f.diffusion for f in layout.frames if f.diffusion.b]
    assert {i.source for i in infos} == {BValueSource.BMATRIX}
    assert {tuple(round(x, 6) + 0.0 for x in i.direction or ()) for i in infos} == set(DIRS)
    assert classify_series([ds]).role is SeriesRole.DWI_DIRECTIONAL
    dwi = assemble_dwi([ds])
    np.testing.assert_allclose(dwi.bvals, [0.0, 1000.0])


def test_bmatrix_isotropic_trace_has_no_direction() -> None:
    trace = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    ds = to_bmatrix(enhanced_series(GRID, trace, manufacturer="Bruker"))
    layout = plan_layout([ds])
    assert all(f.diffusion.direction is None for f in layout.frames)
    assert sorted(_bvals([ds])) == [0.0, 800.0]
    assert classify_series([ds]).role is SeriesRole.DWI_TRACE


def test_vendor_family_names() -> None:
    cases = {
        "SIEMENS": VendorFamily.SIEMENS,
        "Siemens Healthineers": VendorFamily.SIEMENS,
        "GE MEDICAL SYSTEMS": VendorFamily.GE,
        "GE Healthcare": VendorFamily.GE,
        "Philips Medical Systems": VendorFamily.PHILIPS,
        "UIH": VendorFamily.UIH,
        "United Imaging Healthcare": VendorFamily.UIH,
        "Bruker": VendorFamily.BRUKER,
        "GENERIC": VendorFamily.UNKNOWN,
        "": VendorFamily.UNKNOWN,
    }
    for manufacturer, family in cases.items():
        ds = Dataset()
        ds.Manufacturer = manufacturer
        assert vendor_family(ds) is family, manufacturer


# --------------------------------------------------------------------------- Siemens


def test_siemens_mosaic_without_csa_uses_private_image_count_and_b() -> None:
    """De-identified VB/VE mosaics may lose the CSA header but keep (0019,xx0A)/(0019,xx0C)."""
    grid = Grid(n_slices=4)
    vols = volumes(grid, [(0.0, [None]), (800.0, [None])])
    datasets = siemens_mosaic_series(grid, vols)
    for ds, vol in zip(datasets, vols, strict=True):
        del ds[ds.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x10)]
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0A, "US", grid.n_slices)
        block.add_new(0x0C, "IS", str(int(vol.b)))
    layout = plan_layout(datasets)
    assert layout.problems == [] and len(layout.slice_positions) == grid.n_slices
    assert {f.diffusion.source for f in layout.frames} == {BValueSource.SIEMENS_PRIVATE}
    dwi = assemble_dwi(datasets)
    np.testing.assert_array_equal(dwi.bvals, [0.0, 800.0])
    np.testing.assert_allclose(dwi.data[..., 1], vols[1].signal, rtol=1e-6)


def test_siemens_classic_sequence_name_is_the_last_resort() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, [None])])
    datasets = classic_series(GRID, vols, tag_siemens, manufacturer="SIEMENS")
    for ds in datasets:
        del ds[ds.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0C)]
    layout = plan_layout(datasets)
    assert {f.diffusion.source for f in layout.frames} == {BValueSource.SIEMENS_SEQUENCE_NAME}
    assert sorted(_bvals(datasets)) == [0.0, 1000.0]


# --------------------------------------------------------------------------- the reported exports


def test_reported_toshiba_dti_export_520_images(tmp_path: Path) -> None:
    """40 slices × (1 b=0 + 12 b=1500): inspect said ``1500×12`` and "40 of 520 images carry
    no b-value"; dcm2niix reads b = 0 and 1500."""
    grid = Grid(n_slices=40)
    vols = volumes(grid, [(0.0, [None]), (1500.0, TWELVE)])
    for i, ds in enumerate(classic_series(grid, vols, tag_toshiba_classic, manufacturer="TOSHIBA")):
        write(ds, tmp_path / f"{i:04d}.dcm")
    (entry,) = inspect_paths([tmp_path])["series"]
    assert entry["instances"] == 520 and entry["slices"] == 40
    assert entry["volumes_per_b"] == {"0": 1, "1500": 12}
    assert entry["problems"] == []


def test_reported_uih_mosaic_implicit_vr_without_plane(tmp_path: Path) -> None:
    """Implicit VR UIH grid without top-level IPP/IOP: inspect said t2w, 0 slices, "cannot be
    placed"; the UIH private elements decode through the registered UIH dictionary."""
    grid = Grid(n_slices=5)
    vols = volumes(grid, [(1.25, [None]), (929.75, [None])])
    for i, ds in enumerate(uih_grid_without_plane(grid, vols)):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        write(ds, tmp_path / f"{i}.dcm")
    (entry,) = inspect_paths([tmp_path])["series"]
    assert entry["role"] == SeriesRole.DWI_TRACE.value, entry["reasons"]
    assert entry["storage"] == "mosaic" and entry["slices"] == grid.n_slices
    assert entry["b_values"] == [1.25, 929.75] and entry["problems"] == []
    datasets = read_datasets([tmp_path]).datasets
    dwi = assemble_dwi(datasets)
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)
