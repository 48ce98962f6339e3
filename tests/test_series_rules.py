"""One copy of each rule: b-value shells, header text and numbers, the durability setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.analysis.adc import select_adc_bvals
from dicom_node.analysis.dki import DkiModel
from dicom_node.series.bvalues import GROUP_REL_TOL, bvalue_levels, group_bvalues
from dicom_node.series.headers import first_text, floats, number, text
from her2low.core.settings import Durability, Settings

#: Philips b≈0 repeats, the UIH effective-b pair (0.16 % apart) and a pair 1.5 % apart.
BVALS = [0.0, 0.004, 928.29, 929.75, 1000.0, 1015.0, 2000.0]


def test_fit_levels_are_the_assembly_shells() -> None:
    """The DKI fit, the ADC subset and assembly group b-values by the same rule."""
    groups = group_bvalues(BVALS)
    levels, labels = bvalue_levels(BVALS)
    assert [sorted(BVALS[i] for i in g) for g in groups] == [
        [0.0, 0.004], [928.29, 929.75], [1000.0, 1015.0], [2000.0]
    ]  # fmt: skip
    assert levels.tolist() == pytest.approx([0.0, 929.02, 1007.5, 2000.0])
    for level, members in enumerate(groups):
        assert set(labels[members].tolist()) == {level}
    np.testing.assert_array_equal(DkiModel(BVALS).levels, levels)
    _, idx = select_adc_bvals(BVALS, (0.0, 1000.0))
    assert [BVALS[i] for i in idx] == [0.0, 0.004, 1000.0, 1015.0]


def test_levels_refuse_unusable_bvalues() -> None:
    for bad in ([], [0.0, math.nan], [-1.0, 0.0]):
        with pytest.raises(ValueError, match="finite and ≥ 0"):
            bvalue_levels(bad)


def test_tolerance_splits_shells_further_apart() -> None:
    b = 1000.0 * (1.0 + 1.5 * GROUP_REL_TOL)
    assert len(group_bvalues([1000.0, b])) == 2
    assert bvalue_levels([1000.0, b])[0].size == 2


def test_header_text_and_numbers() -> None:
    ds = Dataset()
    ds.SeriesDescription = "ep2d_diff"
    ds.ProtocolName = ""
    ds.StudyDate = "20260101"
    ds.PixelSpacing = [0.8, 0.8]
    assert text(ds, "SeriesDescription") == "ep2d_diff"
    assert text(ds, "ProtocolName") == "" and text(ds, "Modality") == ""
    assert text(ds, "SeriesDescription", "ProtocolName", "StudyDate") == "ep2d_diff  20260101"
    assert first_text(ds, "SeriesDate", "StudyDate") == "20260101"
    assert first_text(ds, "SeriesTime", "StudyTime", default="000000") == "000000"
    assert floats(ds.PixelSpacing, 2) == (0.8, 0.8)
    assert floats(ds.PixelSpacing, 3) is None
    assert floats(None, 2) is None and floats(["1", "inf"], 2) is None
    assert number("2.5", 1.0) == 2.5
    assert number(None, 1.0) == 1.0 and number("nan", 0.0) == 0.0


def test_durability_is_an_enum_checked_by_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HER2LOW_HOME", str(tmp_path))
    monkeypatch.delenv("HER2LOW_CONFIG", raising=False)
    monkeypatch.delenv("HER2LOW_NODE_DURABILITY", raising=False)
    assert Settings().node_durability is Durability.FILE
    monkeypatch.setenv("HER2LOW_NODE_DURABILITY", "full")
    assert Settings().node_durability is Durability.FULL
    monkeypatch.setenv("HER2LOW_NODE_DURABILITY", "sometimes")
    with pytest.raises(ValueError, match="node_durability"):
        Settings()
