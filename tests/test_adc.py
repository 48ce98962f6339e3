"""Mono-exponential ADC on a declared b subset (EUSOBI default: lowest of b 0/50, and 800)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import BVALS, Tissue, dki_signal, make_phantom

from dicom_node.analysis.adc import fit_adc, select_adc_bvals


def test_two_point_formula_in_mm2_per_s() -> None:
    rng = np.random.default_rng(0)
    s = rng.uniform(100, 1000, (5, 4, BVALS.size))
    f = fit_adc(s, BVALS)
    expected = np.log(s[..., 0] / s[..., 2]) / 800.0
    np.testing.assert_allclose(f.adc, expected, rtol=1e-12)
    np.testing.assert_allclose(f.s0, s[..., 0], rtol=1e-12)
    assert f.b_values == (0.0, 800.0)
    assert f.valid.all()


def test_mono_exponential_truth() -> None:
    b = np.array([0.0, 50.0, 400.0, 800.0])
    s = 900.0 * np.exp(-b * 1.1e-3)
    f = fit_adc(s[None, :], b, adc_bvals=(50, 400, 800))
    assert f.adc[0] == pytest.approx(1.1e-3, rel=1e-12)
    assert f.exact_b_values == (50.0, 400.0, 800.0)


def test_default_subset_rule() -> None:
    assert select_adc_bvals(BVALS)[0] == (0.0, 800.0)
    assert select_adc_bvals([50, 800, 1500])[0] == (50.0, 800.0)
    # Philips-style near-zero b counts as b = 0; 801.5 matches 800 within 1 %.
    nominal, idx = select_adc_bvals([0.002, 801.5, 1500])
    assert nominal == (0.0, 800.0) and idx.tolist() == [0, 1]
    with pytest.raises(ValueError, match="b = 800 s/mm² not acquired"):
        select_adc_bvals([0, 1000, 2000])
    with pytest.raises(ValueError, match="b = 0 or 50"):
        select_adc_bvals([100, 800])
    with pytest.raises(ValueError, match="two distinct"):
        select_adc_bvals(BVALS, (800.0, 800.0))


def test_subset_least_squares_matches_polyfit() -> None:
    rng = np.random.default_rng(3)
    s = rng.uniform(50, 1000, (30, BVALS.size))
    f = fit_adc(s, BVALS, adc_bvals=(0, 800, 1000, 1500))
    idx = [0, 2, 3, 4]
    slope = np.polyfit(BVALS[idx], np.log(s[:, idx]).T, 1)[0]
    np.testing.assert_allclose(f.adc, -slope, rtol=1e-10)


def test_invalid_voxels_and_mask() -> None:
    s = np.array([[1000.0, 900, 500, 400, 300, 200], [0.0, 900, 500, 400, 300, 200]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = fit_adc(s, BVALS)
    assert f.valid.tolist() == [True, False]
    assert f.adc[1] == 0.0
    g = fit_adc(s, BVALS, mask=np.array([False, True]))
    assert not g.valid.any()
    with pytest.raises(ValueError, match="mask shape"):
        fit_adc(s, BVALS, mask=np.ones(3, bool))


def test_adc_sits_below_dapp_in_tumour() -> None:
    """Kurtosis makes the 0/800 slope shallower than Dapp (dki-and-features notes)."""
    ph = make_phantom((2, 48, 48), snr=1e6, seed=1)
    tumour = ph.tissue == Tissue.TUMOUR
    clean = dki_signal(ph.s0, ph.dapp, ph.kapp, BVALS)
    adc = fit_adc(clean, BVALS).adc
    gap = (ph.dapp - adc)[tumour]
    assert np.all(gap > 0.05e-3) and np.all(gap < 0.3e-3)
