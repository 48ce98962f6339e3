"""IBSI first-order features: digital phantom consensus values and hand-checked arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.analysis.dki import FitFlag
from dicom_node.analysis.features import (
    BinningMethod,
    discretise,
    first_order,
    map_features,
)
from models.contract import QUANTITATIVE_NAMES

# IBSI 1 digital phantom (Zwanenburg et al., arXiv:1612.07003, "Reference data sets"; data set
# github.com/theibsi/data_sets ibsi_1_digital_phantom, CC BY 4.0): 4 slices of 5 rows × 4
# columns of grey levels, and its ROI mask (6 of the 80 voxels excluded, 74 inside).
IBSI_PHANTOM = np.array(
    [
        [[4, 4, 1, 1], [4, 4, 1, 1], [6, 6, 6, 6], [4, 1, 1, 1], [1, 1, 1, 1]],
        [[4, 1, 1, 1], [1, 1, 1, 1], [6, 3, 9, 1], [4, 1, 1, 1], [1, 1, 1, 1]],
        [[1, 1, 1, 1], [4, 1, 1, 1], [6, 6, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],
        [[1, 1, 1, 1], [4, 4, 4, 4], [4, 4, 4, 4], [1, 1, 1, 1], [1, 1, 1, 1]],
    ],
    dtype=float,
)
IBSI_MASK = np.ones(IBSI_PHANTOM.shape, dtype=bool)
IBSI_MASK[1, 0, 1] = IBSI_MASK[1, 2, 2] = False
IBSI_MASK[3, 3:5, 2:4] = False

# Consensus values (3 significant digits) of the manual's intensity-based statistics (3.3:
# mean, skewness, excess kurtosis, median, P10, P90) and intensity histogram (3.4: entropy;
# the phantom is used without further discretisation, i.e. one bin per grey level).
IBSI_CONSENSUS = {
    "mean": 2.15,
    "skewness": 1.08,
    "kurtosis": -0.355,
    "median": 1.0,
    "p10": 1.0,
    "p90": 4.0,
    "entropy": 1.27,
}


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def test_ibsi_digital_phantom_consensus() -> None:
    values = IBSI_PHANTOM[IBSI_MASK]
    assert values.size == 74
    fo = first_order(values, percentiles=(10, 90), bin_width=1.0, bin_min=1.0)
    for key, ref in IBSI_CONSENSUS.items():
        assert _sig3(fo[key]) == pytest.approx(ref, abs=1e-12), key
    # Fixed bin number over [1, 6] keeps one bin per occupied grey level here.
    fbn = first_order(values, n_bins=6)
    assert _sig3(fbn["entropy"]) == 1.27
    assert fbn["discretisation"]["method"] == BinningMethod.FIXED_BIN_NUMBER.value


def test_hand_computed_statistics() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    # Deviations −3, −2, −1, 0, 6: m2 = 10, m3 = 36, m4 = 278.8.
    fo = first_order(x, bin_width=2.0, bin_min=0.0)
    assert fo["mean"] == 4.0
    assert fo["median"] == 3.0
    assert fo["p5"] == pytest.approx(1.2)  # numpy linear rule: position 0.2
    assert fo["p95"] == pytest.approx(8.8)  # position 3.8: 4 + 0.8 * 6
    assert fo["skewness"] == pytest.approx(36 / 10**1.5)
    assert fo["kurtosis"] == pytest.approx(278.8 / 100 - 3)
    # Bins ⌊x/2⌋+1 = 1, 2, 2, 3, 6 → p = .2 .4 .2 .2
    assert fo["entropy"] == pytest.approx(-(3 * 0.2 * math.log2(0.2) + 0.4 * math.log2(0.4)))
    assert fo["discretisation"] == {
        "method": "fixed_bin_size",
        "bin_width": 2.0,
        "bin_min": 0.0,
        "n_bins": None,
        "below_bin_min": 0,
    }
    pearson = first_order(x, bin_width=2.0, bin_min=0.0, kurtosis="pearson")
    assert pearson["kurtosis"] == pytest.approx(2.788)
    assert pearson["kurtosis_convention"] == "pearson"
    assert set(first_order(x, n_bins=4, percentiles=(2.5, 50))) >= {"p2_5", "p50"}


def test_flat_distribution_and_bad_input() -> None:
    fo = first_order(np.full(7, 1.3e-3), bin_width=2.5e-5, bin_min=0.0)
    assert fo["skewness"] == 0.0 and fo["kurtosis"] == 0.0 and fo["entropy"] == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        first_order([1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one"):
        first_order([1.0, 2.0], bin_width=1.0, n_bins=3)
    with pytest.raises(ValueError, match="no voxels"):
        first_order([], bin_width=1.0)
    with pytest.raises(ValueError, match="finite"):
        first_order([1.0, np.nan], bin_width=1.0)
    with pytest.raises(ValueError):
        first_order([1.0, 2.0], bin_width=1.0, kurtosis="fisher")


def test_fixed_bin_size_from_zero_for_maps() -> None:
    """0.025e-3 mm²/s bins from 0: 1.0e-3 falls in bin 41; values below bin_min still count."""
    bins, disc = discretise(
        np.array([1.0e-3, 1.01e-3, 1.03e-3, -1e-5]), bin_width=2.5e-5, bin_min=0
    )
    assert bins.tolist() == [41, 41, 42, 0]
    assert disc.below_bin_min == 1
    bins, _ = discretise(np.array([0.0, 1.0, 2.0, 3.0]), n_bins=3)
    assert bins.tolist() == [1, 2, 3, 3]  # the maximum goes into the last bin


def test_map_features_keys_counts_and_exclusions() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 6, 6)
    roi = np.zeros(shape, bool)
    roi[1, 1:5, 1:5] = True
    maps = {
        "adc": rng.normal(1.0e-3, 1e-4, shape),
        "dapp": rng.normal(1.2e-3, 1e-4, shape),
        "kapp": rng.normal(0.9, 0.1, shape),
    }
    flags = np.zeros(shape, np.uint8)
    flags[1, 1, 1] = FitFlag.BACKGROUND
    flags[1, 2, 2] = FitFlag.AT_BOUND | FitFlag.DK_BMAX
    flags[0, 0, 0] = FitFlag.AT_BOUND  # outside the ROI: not counted
    valid_adc = np.ones(shape, bool)
    valid_adc[1, 4, 4] = False
    maps["dapp"][1, 1, 1] = 99.0  # a background voxel must not enter the histogram
    mf = map_features(maps, roi, voxel_volume_mm3=8.0, valid={"adc": valid_adc}, flags=flags)
    assert tuple(mf.features) == QUANTITATIVE_NAMES  # the contract's names, in its order
    assert mf.roi_voxels == 16 and mf.roi_volume_ml == pytest.approx(0.128)
    assert mf.voxel_counts == {"adc": 15, "dapp": 15, "kapp": 15}
    assert mf.flag_counts == {"at_bound": 1, "dk_bmax": 1, "low_signal": 0, "background": 1}
    sel = roi & (flags == 0) | (roi & (flags == 3))
    assert mf.features["dapp_mean"] == pytest.approx(maps["dapp"][sel].mean())
    assert mf.features["dapp_mean"] < 2e-3
    assert mf.units["dapp"] == "mm2/s" and mf.settings["bin_width"]["kapp"] == 0.025
    with pytest.raises(ValueError, match="missing"):
        map_features({"adc": maps["adc"]}, roi, voxel_volume_mm3=1.0)
