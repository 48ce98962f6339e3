"""Series roles from headers and breast detection rules."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from dicom_builders import (
    SEGMENTATION_STORAGE,
    Grid,
    classic_series,
    enhanced_series,
    simple_image,
    tag_siemens,
    tag_standard,
    volumes,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.series.roles import BreastRules, SeriesRole, classify_series, detect_breast

GRID = Grid(n_slices=2)
DIRS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


def dwi(
    image_type: Sequence[str],
    shells: list[tuple[float, list]],
    tag=tag_standard,  # type: ignore[no-untyped-def]
    **kw,
) -> list[Dataset]:
    return classic_series(GRID, volumes(GRID, shells), tag, image_type=image_type, **kw)


def test_siemens_tracew_is_usable_trace_although_derived() -> None:
    c = classify_series(
        dwi(
            ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"),
            [(50.0, [None]), (800.0, [None])],
            tag_siemens,
        )
    )
    assert c.role is SeriesRole.DWI_TRACE and c.role.is_fit_input
    assert any("TRACEW" in r for r in c.reasons)


def test_directional_series() -> None:
    c = classify_series(
        dwi(("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), [(0.0, [None]), (1000.0, DIRS)])
    )
    assert c.role is SeriesRole.DWI_DIRECTIONAL
    assert any("3 gradient directions" in r for r in c.reasons)


def test_enhanced_isotropic_is_trace() -> None:
    ds = enhanced_series(GRID, volumes(GRID, [(0.0, [None]), (800.0, [None])]))
    assert classify_series([ds]).role is SeriesRole.DWI_TRACE


@pytest.mark.parametrize("token", ["ADC", "CALC_BVALUE", "EADC", "FA"])
def test_derived_maps_not_fit_input(token: str) -> None:
    c = classify_series(
        dwi(("DERIVED", "PRIMARY", "DIFFUSION", token), [(0.0, [None]), (1000.0, [None])])
    )
    assert c.role is SeriesRole.DWI_DERIVED and not c.role.is_fit_input
    assert any("not usable" in r for r in c.reasons)


def test_adc_by_description_only_when_headers_have_no_b() -> None:
    img = simple_image(
        image_type=("DERIVED", "SECONDARY", "DIFFUSION"), description="ADC (10^-6 mm²/s)"
    )
    assert classify_series([img]).role is SeriesRole.DWI_DERIVED
    # An acquired series whose description says ADC is still acquired data.
    c = classify_series(
        dwi(
            ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
            [(0.0, [None]), (800.0, [None])],
            description="dwi adc",
        )
    )
    assert c.role is SeriesRole.DWI_TRACE


def _series(n_pos: int, n_time: int, **attrs: object) -> list[Dataset]:
    uid = generate_uid()
    out = []
    for t in range(n_time):
        for k in range(n_pos):
            ds = simple_image(
                series_uid=uid, instance=t * n_pos + k + 1, position=(0.0, 0.0, 3.0 * k)
            )
            if n_time > 1:
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = n_time
            for key, value in attrs.items():
                setattr(ds, key, value)
            out.append(ds)
    return out


def test_dce_from_time_points_and_contrast_agent() -> None:
    c = classify_series(
        _series(
            3,
            4,
            ContrastBolusAgent="Gadobutrol",
            ScanningSequence="GR",
            EchoTime=2.0,
            RepetitionTime=5.0,
            SeriesDescription="t1_fl3d",
        )
    )
    assert c.role is SeriesRole.DCE
    assert any("time points" in r for r in c.reasons)


def test_t2_weighted() -> None:
    c = classify_series(_series(3, 1, ScanningSequence="SE", EchoTime=90.0, RepetitionTime=4000.0))
    assert c.role is SeriesRole.T2W


def test_seg_and_other() -> None:
    seg = simple_image(modality="SEG")
    seg.SOPClassUID = SEGMENTATION_STORAGE
    assert classify_series([seg]).role is SeriesRole.SEG
    t1 = _series(3, 1, ScanningSequence="GR", EchoTime=2.0, RepetitionTime=5.0)
    c = classify_series(t1)
    assert c.role is SeriesRole.OTHER and c.reasons
    assert classify_series([]).role is SeriesRole.OTHER


def test_non_breast_recorded_with_reason() -> None:
    c = classify_series(
        dwi(
            ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
            [(0.0, [None]), (1000.0, [None])],
            body_part="BRAIN",
        )
    )
    assert c.role is SeriesRole.DWI_TRACE  # still classified, not dropped
    assert c.is_breast is False
    assert any("BRAIN" in r for r in c.reasons)


def test_breast_evidence_sources() -> None:
    assert detect_breast([simple_image(body_part="BREAST")])[0]
    chest = simple_image(body_part="CHEST", description="Bilateral breast MRI")
    assert detect_breast([chest]) == (True, ["description mentions 'breast'"])
    assert not detect_breast([simple_image(body_part="CHEST")])[0]
    lat = simple_image(body_part=None)
    lat.Laterality = "L"
    assert detect_breast([lat])[0]
    assert not detect_breast([lat], BreastRules(laterality_counts=False))[0]
    coded = simple_image(body_part=None)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "76752008", "SCT", "Breast"
    coded.AnatomicRegionSequence = [item]
    assert detect_breast([coded])[0]
    brain = simple_image(body_part=None)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
    brain.AnatomicRegionSequence = [item]
    ok, reasons = detect_breast([brain])
    assert not ok and "Brain" in reasons[0]


def test_breast_rules_configurable() -> None:
    mamma = simple_image(body_part="MAMMA")
    assert detect_breast([mamma])[0]
    assert not detect_breast([mamma], BreastRules(body_parts=frozenset({"BREAST"})))[0]
    other = simple_image(body_part="CHEST", description="Seno bilateral")
    assert detect_breast([other])[0]
    assert not detect_breast([other], BreastRules(description_keywords=("breast",)))[0]
