"""The noise-floor-aware fit with N coils: non-central χ instead of Rician (issue 12).

Sum-of-squares combined multi-coil magnitudes have a noise floor √(2N−1)·σ-ish, far above the
Rician floor the N = 1 model assumes, so ``nls_rician`` with N = 1 reads Kapp 10–40 % high on
such data at SNR 20–30. With the coil count estimated from the background
(``provenance.noise.effective_coils``) the fit models the non-central χ expectation (Koay &
Basser 2006) and the bias goes; N = 1 stays bit for bit the Rician fit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import axial_geometry
from _dki_phantom import make_phantom as make_dki_phantom

from dicom_node.analysis.dki import DkiModel
from dicom_node.analysis.dki_kernels import NoncentralChiMean, noise_floor_mean, rician_mean
from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.series.volume import DwiVolume

BVALS = np.array([0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0])


def _sos(clean: np.ndarray, sigma: float, coils: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of squares of ``coils`` complex Gaussian channels, the signal on one of them."""
    acc = np.zeros(clean.shape)
    for c in range(coils):
        acc += (rng.normal(0.0, sigma, clean.shape) + (clean if c == 0 else 0.0)) ** 2
        acc += rng.normal(0.0, sigma, clean.shape) ** 2
    return np.sqrt(acc)


def _tumour_voxels(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Homogeneous tumour-like truth: D 0.9–1.6 ×10⁻³ mm²/s, K 0.6–0.95, S0 1000."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.9e-3, 1.6e-3, m)
    k = rng.uniform(0.6, 0.95, m)
    bd = BVALS[None, :] * d[:, None]
    return 1000.0 * np.exp(-bd + bd * bd * k[:, None] / 6.0), d, k


# --- the expectation -------------------------------------------------------------------------


@pytest.mark.parametrize("coils", [2, 4, 8])
def test_chi_mean_matches_monte_carlo(coils: int) -> None:
    rng = np.random.default_rng(coils)
    table = NoncentralChiMean(float(coils))
    amps = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    m = _sos(np.broadcast_to(amps, (200_000, amps.size)), 1.0, coils, rng)
    mean, _ = table(amps[:, None], np.ones(1))
    np.testing.assert_allclose(mean[:, 0], m.mean(axis=0), rtol=3e-3)


def test_chi_mean_with_one_coil_is_the_rician_mean_and_its_slope_the_derivative() -> None:
    a = np.linspace(0.0, 80.0, 4001)[:, None]  # past a_max = 60: the asymptotic series
    sigma = np.array([1.7])
    e1, de1 = NoncentralChiMean(1.0)(a, sigma)
    e0, de0 = rician_mean(a, sigma)
    # Linear interpolation on a 0.01 grid: within 1e-5·σ of the Bessel form.
    np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-5 * 1.7)
    np.testing.assert_allclose(de1, de0, rtol=0, atol=2e-5)
    table = NoncentralChiMean(4.0)
    h = 1e-4
    e_hi, _ = table(a + h, sigma)
    e_lo, _ = table(a - h, sigma)
    _, de = table(a, sigma)
    inner = (a[:, 0] > 0.05) & (np.abs(a[:, 0] - table.a_max) > 0.05)
    np.testing.assert_allclose(de[inner], ((e_hi - e_lo) / (2 * h))[inner], atol=2e-3)
    # High SNR: E[m] → √(A² + (2N − 1)σ²), the floor of N coils.
    assert table(np.array([[50.0]]), np.ones(1))[0][0, 0] == pytest.approx(
        math.sqrt(50.0**2 + 7.0), rel=1e-5
    )


def test_one_coil_is_the_unchanged_rician_path() -> None:
    assert noise_floor_mean(1.0) is rician_mean
    assert isinstance(noise_floor_mean(3.0), NoncentralChiMean)
    with pytest.raises(ValueError, match="coil"):
        NoncentralChiMean(0.5)


# --- the fit ---------------------------------------------------------------------------------


def test_n_equal_1_gives_exactly_the_rician_fit() -> None:
    clean, _, _ = _tumour_voxels(3000, seed=1)
    y = _sos(clean, 40.0, 1, np.random.default_rng(2))
    model = DkiModel(BVALS, method="nls_rician")
    ref = model.fit(y, sigma=40.0)
    one = model.fit(y, sigma=40.0, coils=1.0)
    np.testing.assert_array_equal(one.params, ref.params)
    np.testing.assert_array_equal(one.flags, ref.flags)
    assert one.settings.coils == 1.0 and one.settings.to_dict()["coils"] == 1.0
    # Methods without a noise-floor model ignore N (and record 1).
    assert DkiModel(BVALS, method="nls").fit(y, sigma=40.0, coils=4.0).settings.coils == 1.0
    with pytest.raises(ValueError, match="coils"):
        model.fit(y, sigma=40.0, coils=0.0)


@pytest.mark.parametrize(("coils", "snr"), [(4, 20.0), (4, 30.0), (8, 20.0), (8, 30.0)])
def test_multi_coil_bias_shrinks_against_the_rician_model(coils: int, snr: float) -> None:
    clean, d, k = _tumour_voxels(6000, seed=coils)
    sigma = 1000.0 / snr
    y = _sos(clean, sigma, coils, np.random.default_rng(int(snr)))
    model = DkiModel(BVALS, method="nls_rician")
    rice = model.fit(y, sigma=sigma)
    chi = model.fit(y, sigma=sigma, coils=float(coils))
    assert chi.settings.coils == float(coils)
    k_rice, k_chi = (float(np.median(f.kapp / k - 1.0)) for f in (rice, chi))
    d_rice, d_chi = (float(np.median(f.dapp / d - 1.0)) for f in (rice, chi))
    assert k_rice > 0.08  # the Rician model leaves the χ floor in Kapp
    assert abs(k_chi) < 0.04 and abs(k_chi) < 0.3 * abs(k_rice)
    assert abs(d_chi) <= abs(d_rice) + 0.002 and abs(d_chi) < 0.02


def test_analysis_fits_with_the_estimated_coil_count() -> None:
    """The pipeline hands the background's N to the fit; provenance records that N."""
    ph = make_dki_phantom((8, 64, 64), snr=25, seed=11)
    data = _sos(ph.noiseless.astype(np.float64), ph.sigma, 4, np.random.default_rng(7))
    dwi = DwiVolume(
        data=data,
        bvals=ph.bvals.copy(),
        geometry=axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid()),
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )
    a = analyse(dwi, settings=AnalysisSettings(method="nls_rician", denoise="none", previews=False))
    noise = a.provenance.noise
    assert noise is not None and noise.method == "background_chi"
    assert noise.effective_coils == pytest.approx(4.0, rel=0.15)
    assert a.fit.settings.coils == noise.effective_coils  # the N the fit used is recorded
    assert not any("N = 1" in p for p in a.provenance.qc.problems)
