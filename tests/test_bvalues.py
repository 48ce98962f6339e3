"""b-values, directions and the Siemens CSA header, one vendor convention at a time."""

from __future__ import annotations

import pytest
from dicom_builders import (
    Grid,
    Vol,
    add_csa,
    classic_series,
    csa2_header,
    ground_truth,
    tag_canon,
    tag_ge,
    tag_philips,
    tag_siemens,
    tag_standard,
    tag_uih,
)
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    BValueSource,
    DirectionalityValues,
    b_label,
    diffusion_info,
    ge_bvalue,
    group_bvalues,
    is_b0,
    private_value,
)
from dicom_node.series.csa import CsaError, csa_float, csa_image_header, csa_int, parse_csa

GRID = Grid(n_slices=1)


def one(tag, b: float, direction=None) -> Dataset:  # type: ignore[no-untyped-def]
    vol = Vol(b, direction, ground_truth(GRID, b))
    return classic_series(GRID, [vol], tag, shuffle_seed=None)[0]


def test_standard_tag_and_direction() -> None:
    info = diffusion_info(one(tag_standard, 800.0, (0.0, 1.0, 0.0)))
    assert info.b == 800.0
    assert info.source is BValueSource.STANDARD
    assert info.direction == (0.0, 1.0, 0.0)


def test_ge_offset_variant_and_b0_only_private() -> None:
    b0 = diffusion_info(one(tag_ge, 0.0))
    b1000 = diffusion_info(one(tag_ge, 1000.0, (0.6, 0.8, 0.0)))
    assert (b0.b, b0.source) == (0.0, BValueSource.GE_PRIVATE)
    assert b1000.b == 1000.0
    assert b1000.direction == pytest.approx((0.6, 0.8, 0.0))
    assert ge_bvalue(1_000_001_000) == 1000.0
    assert ge_bvalue(2_000_000_500) == 500.0
    assert ge_bvalue(1000) == 1000.0


def test_ge_private_found_through_creator_in_another_block() -> None:
    ds = one(tag_standard, 0.0)
    del ds.DiffusionBValue
    # Another creator occupies block 0x10, so GEMS_PARM_01 lands in block 0x11 → (0043,1139).
    ds.private_block(0x0043, "OTHER VENDOR", create=True).add_new(0x39, "IS", [777, 0, 0, 0])
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [1500, 8, 0, 0])
    assert (0x0043, 0x1139) in ds
    info = diffusion_info(ds)
    assert info.b == 1500.0 and info.source is BValueSource.GE_PRIVATE
    assert private_value(ds, 0x0043, "MISSING CREATOR", 0x39) is None


def test_philips_private_and_volume_ids() -> None:
    ds = one(tag_standard, 0.0)
    tag_philips(ds, Vol(0.002, (0.577, 0.577, 0.577)), b_number=4, gradient=1, order=9)
    del ds.DiffusionBValue  # only the private (2001,xx03) remains
    info = diffusion_info(ds)
    assert info.b == pytest.approx(0.002)
    assert info.source is BValueSource.PHILIPS_PRIVATE
    assert info.volume_id == (4, 1) and info.volume_order == 9
    assert info.directionality is DirectionalityValues.DIRECTIONAL


def test_canon_missing_b_with_diffusion_sequence_means_b0() -> None:
    b0 = diffusion_info(one(tag_canon, 0.0))
    assert (b0.b, b0.source) == (0.0, BValueSource.IMPLIED_B0)
    assert diffusion_info(one(tag_canon, 1000.0)).b == 1000.0


def test_no_b_anywhere_is_none() -> None:
    ds = one(tag_standard, 0.0)
    del ds.DiffusionBValue
    assert diffusion_info(ds).b is None


def test_uih_effective_b_preferred_over_standard() -> None:
    ds = one(tag_uih, 1.25)
    ds.DiffusionBValue = 0.0  # nominal
    info = diffusion_info(ds)
    assert info.b == 1.25 and info.source is BValueSource.UIH_PRIVATE
    assert is_b0(info.b)


def test_siemens_private_then_sequence_name() -> None:
    ds = one(tag_siemens, 800.0, (1.0, 0.0, 0.0))
    info = diffusion_info(ds)
    assert (info.b, info.source) == (800.0, BValueSource.SIEMENS_PRIVATE)
    assert info.direction == (1.0, 0.0, 0.0)
    del ds[ds.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0C)]
    info = diffusion_info(ds)
    assert (info.b, info.source) == (800.0, BValueSource.SIEMENS_SEQUENCE_NAME)


def test_csa_b_value_and_direction() -> None:
    ds = one(tag_standard, 0.0)
    del ds.DiffusionBValue
    add_csa(
        ds,
        {
            "B_value": ["1000"],
            "DiffusionGradientDirection": ["0", "0.6", "0.8"],
            "DiffusionDirectionality": ["DIRECTIONAL"],
        },
    )
    info = diffusion_info(ds, csa=csa_image_header(ds))
    assert (info.b, info.source) == (1000.0, BValueSource.SIEMENS_CSA)
    assert info.direction == pytest.approx((0.0, 0.6, 0.8))
    assert info.directionality is DirectionalityValues.DIRECTIONAL


def test_enhanced_frame_item_wins() -> None:
    ds = one(tag_standard, 0.0)
    frame = Dataset()
    item = Dataset()
    item.DiffusionBValue = 1500.0
    item.DiffusionDirectionality = "ISOTROPIC"
    frame.MRDiffusionSequence = [item]
    info = diffusion_info(ds, frame)
    assert (info.b, info.source) == (1500.0, BValueSource.ENHANCED)
    assert info.directionality is DirectionalityValues.ISOTROPIC


def test_grouping_threshold_and_tolerance() -> None:
    bvals = [1000.0, 0.0, 929.75, 0.004, 1.25, 928.29, 0.001, 2000.0]
    groups = group_bvalues(bvals)
    assert [[bvals[i] for i in g] for g in groups] == [
        [0.0, 0.001, 0.004, 1.25],
        [928.29, 929.75],
        [1000.0],
        [2000.0],
    ]
    # Stricter tolerance splits the UIH pair; higher b0 threshold would not.
    assert len(group_bvalues(bvals, rel_tol=0.001)) == 5
    assert len(group_bvalues([0.0, 4.9, 5.0])) == 2
    assert len(group_bvalues([0.0, 4.9, 5.0], b0_threshold=10.0)) == 1
    assert group_bvalues([]) == []


def test_b_label_uses_g_format() -> None:
    assert b_label(0.0010000000474974513) == "0.001"
    assert b_label(1000.0) == "1000"
    assert b_label(929.75) == "929.75"


def test_csa2_round_trip_and_csa1() -> None:
    tags = {"B_value": ["800"], "NumberOfImagesInMosaic": ["12"], "Empty": []}
    for csa1 in (False, True):
        parsed = parse_csa(csa2_header(tags, csa1=csa1))
        assert parsed["B_value"] == ["800"]
        assert csa_int(parsed, "NumberOfImagesInMosaic") == 12
        assert parsed["Empty"] == []
        assert csa_float(parsed, "Missing") is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"SV10\x04\x03\x02\x01",
        b"SV10\x04\x03\x02\x01" + (5).to_bytes(4, "little") + b"\0" * 4 + b"x" * 70,
    ],
)
def test_csa_corrupt(raw: bytes) -> None:
    with pytest.raises(CsaError):
        parse_csa(raw)
