"""Noise-robust features: σ and coil count from the data, MP-PCA, the bound fraction, features.

Issue 12 ("Histogram features that survive the scanner's noise"). The feature test is a small
version of ``benchmarks/bench_features.py``: the project's phantom (mass with a necrotic core),
SNR 20, the noise-floor-aware fit on MP-PCA-denoised data, against the noise-free maps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import BVALS, axial_geometry, make_phantom, rician

from dicom_node.analysis import noise
from dicom_node.analysis.adc import fit_adc
from dicom_node.analysis.denoise import mppca, mppca_region
from dicom_node.analysis.dki import DkiModel
from dicom_node.analysis.features import FEATURE_NAMES, map_features
from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.series.volume import DwiVolume
from dicom_node.synth.phantom import S0_FGT_NOMINAL, add_rician_noise, dki_signal, rng_stream
from dicom_node.synth.phantom import make_phantom as make_study_phantom
from dicom_node.synth.study import study_geometry
from models.contract import (
    LEGACY_CONVENTIONS,
    AnalysisConventions,
    FitSettings,
    Provenance,
    QcReport,
    TrainingSettings,
)


def _sos_magnitude(clean: np.ndarray, sigma: float, coils: int, seed: int) -> np.ndarray:
    """Sum-of-squares combination of ``coils`` channels (signal on one): central χ in air."""
    rng = np.random.default_rng(seed)
    acc = np.zeros(clean.shape)
    for c in range(coils):
        re = rng.normal(0.0, sigma, clean.shape) + (clean if c == 0 else 0.0)
        acc += re**2 + rng.normal(0.0, sigma, clean.shape) ** 2
    return np.sqrt(acc)


def _body(shape: tuple[int, ...]) -> np.ndarray:
    clean = np.zeros((*shape, BVALS.size))
    clean[:, 12:36, 12:36, :] = 1000.0 * np.exp(-BVALS * 1.2e-3)
    return clean


@pytest.mark.parametrize("snr", [10.0, 30.0])
def test_sigma_within_10_percent_on_rician_data(snr: float) -> None:
    ph = make_phantom((6, 48, 48), snr=snr, seed=3)
    est = noise.estimate_noise(ph.signal, bvals=BVALS)
    assert est is not None
    assert est.sigma == pytest.approx(ph.sigma, rel=0.10)
    assert est.method is noise.NoiseMethod.BACKGROUND
    assert est.effective_coils == 1.0 and est.rician  # N = 1 accepted by the moment check
    assert est.moment_ratio == pytest.approx(math.pi / 4, abs=0.03)


@pytest.mark.parametrize("coils", [2, 4, 8])
def test_non_central_chi_coil_count_and_sigma(coils: int) -> None:
    m = _sos_magnitude(_body((4, 48, 48)), 20.0, coils, seed=coils)
    est = noise.estimate_noise(m, bvals=BVALS)
    assert est is not None and est.method is noise.NoiseMethod.BACKGROUND_CHI
    assert est.effective_coils == pytest.approx(coils, rel=0.15)
    assert est.sigma == pytest.approx(20.0, rel=0.10)
    assert not est.rician
    # The Rayleigh-only estimator refuses χ data with many coils rather than return a wrong σ.
    if coils >= 4:
        assert noise.estimate_sigma(m, bvals=BVALS) is None


def test_chi_moment_ratio_known_values() -> None:
    assert noise.chi_moment_ratio(1.0) == pytest.approx(math.pi / 4, rel=1e-12)
    assert noise.chi_moment_ratio(50.0) == pytest.approx(1.0, abs=0.01)


def test_sigma_from_repeats_without_background() -> None:
    """No air in the field of view: repeated b = 0 images give σ (Gaussian regime)."""
    b = np.array([0.0, 0.0, 0.0, 800.0, 2000.0])
    rng = np.random.default_rng(2)
    s0 = rng.uniform(600.0, 1400.0, (4, 30, 30))
    clean = s0[..., None] * np.exp(-b * 1.5e-3)
    y = rician(clean, 25.0, rng)
    assert noise.estimate_sigma(y, bvals=b) is None  # no background
    est = noise.estimate_noise(y, bvals=b)
    assert est is not None and est.method is noise.NoiseMethod.REPEATS
    assert est.sigma == pytest.approx(25.0, rel=0.10)
    assert noise.estimate_sigma_repeats(y[..., 3:], b[3:]) is None  # no repeats


def _low_rank(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape, n = (12, 12, 10), 16
    basis = rng.normal(size=(3, n))
    coef = 3.0 + 0.3 * rng.normal(size=(*shape, 3))
    clean = 100.0 + 10.0 * coef @ basis
    return clean, clean + rng.normal(0.0, 5.0, clean.shape)


def test_mppca_reduces_noise_and_estimates_sigma() -> None:
    clean, noisy = _low_rank()
    res = mppca(noisy, patch_radius=2)
    before = np.std(noisy - clean)
    after = np.std(res.data - clean)
    assert after < 0.6 * before
    assert res.sigma_median == pytest.approx(5.0, rel=0.15)
    assert np.median(res.n_signal) <= 5  # ~3 signal components kept of 16


def test_mppca_agrees_with_dipy() -> None:
    localpca = pytest.importorskip("dipy.denoise.localpca")
    clean, noisy = _low_rank(1)
    mask = np.zeros(clean.shape[:3], bool)
    mask[2:10, 1:11, 2:9] = True
    ours = mppca(noisy, mask=mask, patch_radius=2).data
    ref = localpca.mppca(noisy, mask=mask, patch_radius=2, suppress_warning=True)
    # Same estimator: equal to rounding (tolerance far below the noise σ = 5).
    np.testing.assert_allclose(ours, ref, atol=1e-6 * float(np.abs(ref).max()))
    assert np.all(ours[~mask] == 0)


def test_mppca_region_only_touches_the_region() -> None:
    clean, noisy = _low_rank(2)
    region = np.zeros(clean.shape[:3], bool)
    region[4:8, 4:8, 3:7] = True
    out = mppca_region(noisy, region)
    assert out is not None
    np.testing.assert_array_equal(out[~region], noisy[~region])
    assert np.std(out[region] - clean[region]) < np.std(noisy[region] - clean[region])
    thin = np.zeros((12, 12, 3), bool)
    thin[4:8, 4:8, 1] = True
    assert mppca_region(noisy[:, :, :3], thin) is None  # thinner than a patch


def test_fraction_at_bound_and_noise_in_provenance() -> None:
    ph = make_phantom((8, 64, 64), snr=15, seed=31)
    geom = axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid())
    dwi = DwiVolume(
        data=ph.signal,
        bvals=ph.bvals.copy(),
        geometry=geom,
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )
    a = analyse(dwi, settings=AnalysisSettings(previews=False))
    qc = a.provenance.qc
    assert qc.fraction_at_bound is not None
    assert qc.fraction_at_bound == pytest.approx(qc.flags.at_bound / a.roi.voxels, abs=0.02)
    assert a.provenance.noise is not None
    assert a.provenance.noise.sigma == pytest.approx(ph.sigma, rel=0.10)
    assert a.provenance.noise.method == "background"
    body = a.provenance.model_dump(mode="json")
    assert body["fit"]["denoise"] == "mppca"  # the default where sigma is known (dki-2)
    assert Provenance.model_validate(body) == a.provenance
    raw = analyse(dwi, settings=AnalysisSettings(previews=False, denoise="none"))
    assert "denoise" not in raw.provenance.model_dump(mode="json")["fit"]  # as dki-1 sent it
    assert a.provenance.conventions.differences(raw.provenance.conventions) == [
        "fit.denoise: result None, model 'mppca'"
    ]
    with pytest.raises(ValueError, match="denoise"):
        AnalysisSettings(denoise="gaussian")


def test_contract_additions_are_backwards_compatible() -> None:
    assert "fraction_at_bound" not in QcReport().model_dump(mode="json")
    assert "denoise" not in FitSettings().model_dump(mode="json")
    legacy = TrainingSettings(conventions=LEGACY_CONVENTIONS)
    card = legacy.to_card()
    assert "denoise" not in card and TrainingSettings.from_card(card) == legacy
    mp = TrainingSettings(conventions=AnalysisConventions(fit=FitSettings(denoise="mppca")))
    assert TrainingSettings.from_card(mp.to_card()) == mp


def _features(
    maps: dict[str, np.ndarray], tumour: np.ndarray, valid: dict[str, np.ndarray]
) -> dict[str, float]:
    mf = map_features(maps, tumour, voxel_volume_mm3=1.0, valid=valid)
    return {k: mf.features[k] for k in FEATURE_NAMES}


def test_features_at_snr_20_within_goal() -> None:
    """Mean/median within 5 % of the noise-free maps, ≤ 2 % voxels at a bound, core kept."""
    geometry = study_geometry((96, 192), 20, 3.0, "1.2.826.0.1.3680043.10.1389.2")
    ph = make_study_phantom(geometry, seed=0, lesion="mass", necrotic_core=True)
    assert ph.core is not None and ph.core.any()
    clean = dki_signal(ph.s0, ph.dapp, ph.kapp, BVALS)
    noisy = add_rician_noise(clean, S0_FGT_NOMINAL / 20.0, rng_stream(0, 5))
    est = noise.estimate_noise(noisy, bvals=BVALS)
    assert est is not None
    tumour = ph.tumour_mask
    region = ndimage.binary_dilation(tumour, iterations=3)
    box = tuple(
        slice(int(lo), int(hi) + 1)
        for lo, hi in zip(
            np.argwhere(region).min(0) - 3, np.argwhere(region).max(0) + 3, strict=True
        )
    )
    noisy, clean, tumour, region = noisy[box], clean[box], tumour[box], region[box]
    core = ph.core[box] & tumour
    ref_adc = fit_adc(clean, BVALS)
    ref = _features(
        {"adc": ref_adc.adc, "dapp": ph.dapp[box], "kapp": ph.kapp[box]},
        tumour,
        {"adc": ref_adc.valid},
    )

    def run(data: np.ndarray, method: str) -> tuple[dict[str, float], float, np.ndarray]:
        adc = fit_adc(data, BVALS)
        fit = DkiModel(BVALS, method=method).fit(data, mask=region, sigma=est.sigma)
        maps = {"adc": adc.adc, "dapp": fit.dapp, "kapp": fit.kapp}
        return _features(maps, tumour, {"adc": adc.valid}), fit.fraction_at_bound(tumour), fit.dapp

    denoised = mppca_region(noisy, region)
    assert denoised is not None
    new, at_bound, dapp = run(denoised, "nls_rician")
    old, old_bound, _ = run(noisy, "nls")  # the dki-1 default (and today's no-sigma fallback)
    for name in FEATURE_NAMES:
        if name.endswith(("_mean", "_median")):
            assert new[name] == pytest.approx(ref[name], rel=0.05), name
    assert at_bound <= 0.02 < old_bound

    def err(f: dict[str, float], k: str) -> float:
        return abs(f[k] - ref[k]) / (abs(ref[k]) if k.endswith(("_p5", "_p95")) else 1.0)

    tails = [k for k in FEATURE_NAMES if k.startswith(("dapp", "kapp")) and "mean" not in k]
    tails = [k for k in tails if "median" not in k]
    for k in tails:  # percentiles and entropy shrink one by one; the shape moments on the whole
        if k.endswith(("_p5", "_p95", "_entropy")):  # (one small tumour: noisy per seed)
            assert err(new, k) < err(old, k), k
    assert sum(err(new, k) for k in tails) < 0.75 * sum(err(old, k) for k in tails)
    rim = tumour & ~core
    truth_dd = ph.dapp[box][core].mean() - ph.dapp[box][rim].mean()
    assert dapp[core].mean() - dapp[rim].mean() == pytest.approx(truth_dd, rel=0.10)
