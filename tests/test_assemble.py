"""assemble_dwi on synthetic series of every storage style and vendor convention."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_builders import (
    Grid,
    Vol,
    classic_series,
    enhanced_series,
    ground_truth,
    siemens_mosaic_series,
    tag_canon,
    tag_ge,
    tag_none,
    tag_philips,
    tag_siemens,
    tag_standard,
    uih_grid_series,
    volumes,
)
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from dicom_node.series.assemble import AssemblyError, assemble_dwi
from dicom_node.series.frames import StorageStyle
from dicom_node.series.layout import ProblemKind, plan_layout

GRID = Grid()
DIRS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


def geo_mean(arrs: list[NDArray[np.uint16]] | list[NDArray[np.float64]]) -> NDArray[np.float64]:
    return np.asarray(np.exp(np.mean(np.log(np.stack(arrs).astype(np.float64)), axis=0)))


def assert_geometry(vol_geom_origin: tuple[float, float, float], grid: Grid) -> None:
    assert vol_geom_origin == pytest.approx(grid.position(0), abs=1e-3)


def test_directional_images_combined_by_geometric_mean() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, DIRS)])
    dwi = assemble_dwi(classic_series(GRID, vols, tag_standard))
    assert dwi.data.dtype == np.float32
    assert dwi.data.shape == (3, 4, 6, 2)
    np.testing.assert_array_equal(dwi.bvals, [0.0, 800.0])
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)
    expected = geo_mean([v.signal for v in vols[1:]])
    np.testing.assert_allclose(dwi.data[..., 1], expected, rtol=1e-5)
    # Not the arithmetic mean: the geometric mean is strictly smaller for unequal signals.
    arith = np.mean(np.stack([v.signal for v in vols[1:]]).astype(float), axis=0)
    assert np.all(dwi.data[..., 1] < arith - 1e-3)
    assert any("geometric mean" in n for n in dwi.notes)


def test_slices_ordered_by_geometry_not_instance_number() -> None:
    grid = Grid(iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), origin=(40.0, -5.0, 12.0), n_slices=5)
    vols = volumes(grid, [(0.0, [None]), (1000.0, [None])])
    datasets = classic_series(grid, vols, tag_siemens, manufacturer="SIEMENS")
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers != sorted(numbers)
    dwi = assemble_dwi(datasets)
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)
    np.testing.assert_allclose(dwi.data[..., 1], vols[1].signal, rtol=1e-6)
    g = dwi.geometry
    assert_geometry(g.origin, grid)
    assert g.slice_spacing == pytest.approx(4.0)
    assert (g.row_spacing, g.col_spacing) == (2.0, 1.5)
    np.testing.assert_allclose(g.normal, grid.normal)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for k, uid in enumerate(dwi.slice_sop_instance_uids):
        assert tuple(float(x) for x in by_uid[uid].ImagePositionPatient) == pytest.approx(
            g.slice_position(k), abs=1e-3
        )
        assert float(by_uid[uid].private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value) == 0


def test_siemens_mosaic_untiled_with_csa() -> None:
    grid = Grid(n_slices=5, rows=4, cols=6)  # 3x3 tiles, four empty
    vols = volumes(grid, [(0.0, [None]), (1000.0, DIRS[:2])])
    datasets = siemens_mosaic_series(grid, vols)
    assert (datasets[0].Rows, datasets[0].Columns) == (12, 18)
    layout = plan_layout(datasets)
    assert layout.storage is StorageStyle.MOSAIC
    assert len(layout.slice_positions) == 5 and (layout.rows, layout.columns) == (4, 6)
    dwi = assemble_dwi(datasets)
    assert dwi.data.shape == (5, 4, 6, 2)
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)
    np.testing.assert_allclose(
        dwi.data[..., 1], geo_mean([vols[1].signal, vols[2].signal]), rtol=1e-5
    )
    assert_geometry(dwi.geometry.origin, grid)
    assert dwi.geometry.slice_spacing == pytest.approx(4.0)


def test_canon_classic_b0_without_b_tag() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, [None])])
    dwi = assemble_dwi(classic_series(GRID, vols, tag_canon, manufacturer="CANON_MEC"))
    np.testing.assert_array_equal(dwi.bvals, [0.0, 1000.0])
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)


def test_canon_enhanced_b0_frames_without_b() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1500.0, [None])])
    ds = enhanced_series(GRID, vols, manufacturer="CANON_MEC", omit_b0_value=True)
    dwi = assemble_dwi([ds])
    np.testing.assert_array_equal(dwi.bvals, [0.0, 1500.0])
    np.testing.assert_allclose(dwi.data[..., 1], vols[1].signal, rtol=1e-6)


def test_uih_grid_near_b0_and_effective_b_grouped() -> None:
    grid = Grid(n_slices=3)
    vols = [
        Vol(1.25, None, ground_truth(grid, 0.0)),
        Vol(929.75, DIRS[0], ground_truth(grid, 929.75, 1.1e-3)),
        Vol(928.29, DIRS[1], ground_truth(grid, 928.29, 0.7e-3)),
    ]
    datasets = uih_grid_series(grid, vols)
    assert plan_layout(datasets).storage is StorageStyle.MOSAIC
    dwi = assemble_dwi(datasets)
    assert dwi.bvals.tolist() == pytest.approx([1.25, (929.75 + 928.29) / 2])
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, rtol=1e-6)
    np.testing.assert_allclose(
        dwi.data[..., 1], geo_mean([vols[1].signal, vols[2].signal]), rtol=1e-5
    )
    assert any("grouped as one shell" in n for n in dwi.notes)
    assert_geometry(dwi.geometry.origin, grid)


def test_ge_offset_private_b() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, DIRS)])
    dwi = assemble_dwi(classic_series(GRID, vols, tag_ge, manufacturer="GE MEDICAL SYSTEMS"))
    np.testing.assert_array_equal(dwi.bvals, [0.0, 1000.0])
    np.testing.assert_allclose(dwi.data[..., 1], geo_mean([v.signal for v in vols[1:]]), rtol=1e-5)


def test_enhanced_philips_multiframe_scrambled_frames_and_rescale() -> None:
    vols = volumes(GRID, [(0.0, [None]), (1000.0, DIRS)])
    ds = enhanced_series(GRID, vols, slope=2.0)
    layout = plan_layout([ds])
    assert layout.storage is StorageStyle.ENHANCED and len(layout.volumes) == 4
    dwi = assemble_dwi([ds])
    stored = [np.round(v.signal / 2.0) * 2.0 for v in vols]  # slope 2 quantises by 2
    np.testing.assert_allclose(dwi.data[..., 0], stored[0], rtol=1e-6)
    np.testing.assert_allclose(dwi.data[..., 1], geo_mean(stored[1:]), rtol=1e-5)
    assert dwi.slice_sop_instance_uids == [str(ds.SOPInstanceUID)] * 3


def test_philips_near_zero_b_repeats_form_one_b0_shell() -> None:
    vols = volumes(GRID, [(0.0, [None]), (0.001, [None]), (0.002, [None]), (1000.0, [None])])
    datasets = []
    for n, vol in enumerate(vols):

        def tag(ds: Dataset, v: Vol, n: int = n) -> None:
            tag_philips(ds, v, b_number=n + 1, gradient=1, order=n + 1)

        datasets += classic_series(
            GRID, [vol], tag, manufacturer="Philips", series_uid="1.2.3.4", study_uid="1.2.3"
        )
    layout = plan_layout(datasets)
    assert [v.b for v in layout.volumes] == pytest.approx([0.0, 0.001, 0.002, 1000.0])
    dwi = assemble_dwi(datasets)
    assert dwi.bvals.tolist() == pytest.approx([0.001, 1000.0])
    np.testing.assert_allclose(
        dwi.data[..., 0],
        np.mean(np.stack([v.signal for v in vols[:3]]).astype(float), axis=0),
        rtol=1e-6,
    )


def test_rescale_slope_intercept_applied() -> None:
    vols = volumes(GRID, [(0.0, [None]), (500.0, [None])])
    dwi = assemble_dwi(classic_series(GRID, vols, tag_standard, rescale=(0.5, 100.0)))
    np.testing.assert_allclose(dwi.data[..., 0], vols[0].signal, atol=0.5)


def test_compressed_transfer_syntax_decoded() -> None:
    vols = volumes(GRID, [(0.0, [None]), (500.0, [None])])
    datasets = classic_series(GRID, vols, tag_standard)
    for ds in datasets:
        ds.compress(RLELossless)
    assert datasets[0].file_meta.TransferSyntaxUID == RLELossless
    dwi = assemble_dwi(datasets)
    np.testing.assert_allclose(dwi.data[..., 1], vols[1].signal, rtol=1e-6)


def _kinds(datasets: list[Dataset]) -> set[ProblemKind]:
    with pytest.raises(AssemblyError) as info:
        assemble_dwi(datasets)
    assert str(info.value)
    return info.value.kinds


def test_several_stacks_by_orientation() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    other = Grid(iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    datasets = classic_series(GRID, vols, series_uid="1.2.9", study_uid="1.2")
    datasets += classic_series(
        other, volumes(other, [(0.0, [None]), (800.0, [None])]), series_uid="1.2.9", study_uid="1.2"
    )
    assert ProblemKind.SEVERAL_STACKS in _kinds(datasets)


def test_several_stacks_overlapping_positions() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    shifted = Grid(origin=(60.0, -20.0, 30.0))  # same slice locations, other in-plane origin
    datasets = classic_series(GRID, vols, series_uid="1.2.8", study_uid="1.2")
    datasets += classic_series(shifted, vols, series_uid="1.2.8", study_uid="1.2")
    layout = plan_layout(datasets)
    assert any(p.kind is ProblemKind.SEVERAL_STACKS for p in layout.problems)
    assert ProblemKind.SEVERAL_STACKS in _kinds(datasets)


def test_missing_b_values_is_a_clear_error() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    datasets = classic_series(GRID, vols, tag_none)
    with pytest.raises(AssemblyError, match="carry no b-value") as info:
        assemble_dwi(datasets)
    assert ProblemKind.MISSING_B_VALUES in info.value.kinds


def test_missing_slice_of_one_b() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, [None])])
    datasets = classic_series(GRID, vols, tag_standard, shuffle_seed=None)
    del datasets[4]  # b=800, slice 1
    with pytest.raises(AssemblyError, match="b=800") as info:
        assemble_dwi(datasets)
    assert info.value.kinds == {ProblemKind.MISSING_SLICES}


def test_gap_in_slice_positions_reported() -> None:
    grid = Grid(n_slices=5)
    datasets = classic_series(
        grid, volumes(grid, [(0.0, [None]), (800.0, [None])]), tag_standard, shuffle_seed=None
    )
    datasets = [ds for i, ds in enumerate(datasets) if i % 5 != 2]  # slice 2 of every b
    assert ProblemKind.MISSING_SLICES in _kinds(datasets)


def test_several_series_rejected() -> None:
    a = classic_series(GRID, volumes(GRID, [(0.0, [None])]))
    b = classic_series(GRID, volumes(GRID, [(0.0, [None])]))
    assert _kinds(a + b) == {ProblemKind.MIXED_SERIES}
    assert _kinds([]) == {ProblemKind.NO_IMAGES}


def test_scanner_trace_ignored_when_directions_present() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, DIRS)])
    trace = Vol(800.0, None, ground_truth(GRID, 800.0, 5e-3))
    datasets = classic_series(GRID, [*vols, trace], tag_standard)
    dwi = assemble_dwi(datasets)
    np.testing.assert_allclose(dwi.data[..., 1], geo_mean([v.signal for v in vols[1:]]), rtol=1e-5)
    assert any("trace image(s) ignored" in n for n in dwi.notes)


def test_mosaic_without_image_count_is_reported() -> None:
    grid = Grid(n_slices=4)
    datasets = siemens_mosaic_series(grid, volumes(grid, [(0.0, [None]), (800.0, [None])]))
    for ds in datasets:
        del ds[ds.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x10)]
    layout = plan_layout(datasets)
    assert any("NumberOfImagesInMosaic" in p.message for p in layout.problems)
    assert ProblemKind.UNSUPPORTED_PIXELS in _kinds(datasets)


def test_image_without_position_is_reported() -> None:
    datasets = classic_series(GRID, volumes(GRID, [(0.0, [None]), (800.0, [None])]))
    del datasets[0].ImagePositionPatient
    layout = plan_layout(datasets)
    assert any("cannot be placed" in p.message for p in layout.problems)
    assert ProblemKind.INCONSISTENT_GEOMETRY in _kinds(datasets)
