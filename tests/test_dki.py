"""DKI model/fit: DIPY equivalence, accuracy on phantoms with known truth, noise floor, flags."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import BVALS, Tissue, dki_signal, make_phantom, rician

from dicom_node.analysis import dki, dki_kernels, noise
from dicom_node.analysis.dki import Bounds, DkiFit, DkiMethod, DkiModel, FitFlag


def _fitted(f: DkiFit) -> np.ndarray:
    return (f.flags & FitFlag.BACKGROUND) == 0


# --------------------------------------------------------------------------- DIPY equivalence


def test_wls_equals_dipy_msdki() -> None:
    """Our vectorised WLS is DIPY's msdki estimator (weights n·S², log-linear) to 1e-9.

    DIPY is called as the notes prescribe: ``gradient_table(..., b0_threshold=0)`` and
    ``bmag=1`` (otherwise b = 50 is merged into b = 0).
    """
    gradients = pytest.importorskip("dipy.core.gradients")
    msdki = pytest.importorskip("dipy.reconst.msdki")
    ph = make_phantom((3, 24, 24), snr=30, seed=4)
    data = ph.signal.astype(np.float64)
    ours = dki.fit(data, BVALS, method="wls", sigma=ph.sigma)
    mask = _fitted(ours)
    assert mask.sum() > 300
    bvecs = np.zeros((BVALS.size, 3))
    bvecs[BVALS > 0, 0] = 1.0
    gtab = gradients.gradient_table(BVALS, bvecs=bvecs, b0_threshold=0)
    model = msdki.MeanDiffusionKurtosisModel(gtab, bmag=1, return_S0_hat=True)
    ref = model.fit(data, mask=mask)
    np.testing.assert_allclose(ours.dapp[mask], ref.msd[mask], rtol=1e-9, atol=0)
    # Kapp relative to its natural scale max(|K|, 1): near K = 0 the ratio x1/x0² of DIPY's own
    # raw-unit pinv solution carries ~1e-11 absolute rounding.
    np.testing.assert_allclose(ours.kapp[mask], ref.msk[mask], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours.s0[mask], ref.S0_hat[mask], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- model checks


@pytest.mark.parametrize(
    "bvals",
    [
        [0, 1000],
        [0, 0.001, 0.002, 1000, 1000],  # Philips "b=0" repeats are one level
        [0, 800, 805],  # 800 and 805 are one level (1 % tolerance)
    ],
)
def test_model_needs_three_b_levels(bvals: list[float]) -> None:
    with pytest.raises(ValueError, match="at least 3 distinct b-values"):
        DkiModel(bvals)


def test_model_checks_inputs() -> None:
    with pytest.raises(ValueError):
        DkiModel(BVALS, method="ols")
    with pytest.raises(ValueError):
        DkiModel([0, -5, 800, 1500])
    with pytest.raises(ValueError):
        DkiModel(BVALS, dki_bmin=1600)  # leaves only 2000
    with pytest.raises(ValueError):
        Bounds(dapp=(3e-3, 1e-3))
    model = DkiModel(BVALS)
    with pytest.raises(ValueError, match="mask shape"):
        model.fit(np.ones((2, 3, 6)), mask=np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="b entries"):
        model.fit(np.ones((2, 3, 5)))
    assert model.method is DkiMethod.NLS


def test_noiseless_truth_recovered_by_every_method() -> None:
    rng = np.random.default_rng(1)
    n = 500
    d = rng.uniform(0.6e-3, 2.4e-3, n)
    k = rng.uniform(0.2, 1.2, n)
    k = np.minimum(k, 2.5 / (d * 2000))
    s0 = rng.uniform(500, 1500, n)
    y = dki_signal(s0, d, k, BVALS)
    for method in DkiMethod:
        f = dki.fit(y, BVALS, method=method, sigma=1.0)
        np.testing.assert_allclose(f.dapp, d, rtol=2e-4)
        np.testing.assert_allclose(f.kapp, k, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(f.s0, s0, rtol=2e-4)


def test_settings_dki_bmin_and_slicing() -> None:
    d, k, s0 = np.full(20, 1.1e-3), np.full(20, 0.9), np.full(20, 800.0)
    y = dki_signal(s0, d, k, BVALS).reshape(4, 5, 6)
    f = dki.fit(y, BVALS, dki_bmin=100, sigma=2.0)
    assert f.settings.bvals == (800.0, 1000.0, 1500.0, 2000.0)
    assert f.settings.dki_bmin == 100
    assert f.settings.sigma == 2.0
    assert f.settings.to_dict()["bounds"] == {"dapp": [0.0, 0.0035], "kapp": [0.0, 3.0]}
    np.testing.assert_allclose(f.dapp, 1.1e-3, rtol=1e-4)
    np.testing.assert_allclose(f.s0, 800.0, rtol=1e-3)  # extrapolated to b = 0
    sub = f[1:3]
    assert isinstance(sub, DkiFit)
    assert sub.params.shape == (2, 5, 3)
    assert sub.dapp.shape == sub.flags.shape == (2, 5)
    assert f[0, 0].params.shape == (3,)
    with pytest.raises(IndexError):
        _ = f[..., 0]


def test_chunked_and_threaded_fits_agree() -> None:
    ph = make_phantom((2, 32, 32), snr=30, seed=2)
    ref = DkiModel(BVALS, sigma=ph.sigma).fit(ph.signal)
    small = DkiModel(BVALS, sigma=ph.sigma, chunk_size=97, n_threads=2).fit(ph.signal)
    m = _fitted(ref)
    # float32 BLAS sums round differently per block size, so two runs stop at slightly
    # different points inside the convergence tolerance — far below the noise (~10 %).
    np.testing.assert_allclose(small.dapp[m], ref.dapp[m], rtol=5e-3, atol=1e-8)
    np.testing.assert_allclose(small.kapp[m], ref.kapp[m], rtol=0, atol=0.02)
    assert np.mean(small.flags == ref.flags) > 0.995


def test_mask_limits_the_fit() -> None:
    ph = make_phantom((2, 32, 32), snr=30, seed=3)
    mask = ph.tissue == Tissue.TUMOUR
    f = dki.fit(ph.signal, BVALS, mask=mask, sigma=ph.sigma)
    assert np.all(f.params[~mask] == 0)
    assert np.all(f.dapp[mask] > 0)


def test_estimate_sigma_from_background() -> None:
    ph = make_phantom((8, 64, 64), snr=30, seed=5)
    est = noise.estimate_sigma(ph.signal)
    assert est is not None
    assert est == pytest.approx(ph.sigma, rel=0.05)
    # No background at all (tissue everywhere): refuse rather than guess.
    tissue_only = ph.signal[ph.tissue == Tissue.FGT][None, :, :]
    assert noise.estimate_sigma(tissue_only) is None


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("snr", "d_bias", "d_rmse", "k_bias", "k_rmse"),
    [
        (30, 0.03e-3, 0.20e-3, 0.05, 0.32),
        (15, 0.05e-3, 0.35e-3, 0.08, 0.55),
    ],
)
def test_nls_phantom_accuracy(
    snr: float, d_bias: float, d_rmse: float, k_bias: float, k_rmse: float
) -> None:
    """Tumour voxels: bias and RMSE against the truth; no voxel leaves the bounds."""
    ph = make_phantom((8, 64, 64), snr=snr, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = dki.fit(ph.signal, BVALS, method="nls")
        w = dki.fit(ph.signal, BVALS, method="wls")
    fitted = _fitted(f)
    sel = (ph.tissue == Tissue.TUMOUR) & fitted
    assert sel.sum() > 600
    dd = f.dapp[sel] - ph.dapp[sel]
    kk = f.kapp[sel] - ph.kapp[sel]
    assert abs(np.mean(dd)) < d_bias
    assert np.sqrt(np.mean(dd**2)) < d_rmse
    assert abs(np.median(kk)) < k_bias
    assert np.sqrt(np.mean(kk**2)) < k_rmse
    # Bounded: every fitted voxel inside (0, 3.5e-3] x [0, 3].
    assert np.all(f.dapp[fitted] > 0)
    assert np.all(f.dapp[fitted] <= 3.5e-3)
    assert np.all((f.kapp[fitted] >= 0) & (f.kapp[fitted] <= 3))
    # NLS improves on the unconstrained log-linear start in tissue.
    tissue = np.isin(ph.tissue, [Tissue.FGT, Tissue.TUMOUR]) & fitted
    rmse_nls = np.sqrt(np.mean((f.kapp - ph.kapp)[tissue] ** 2))
    rmse_wls = np.sqrt(np.mean((w.kapp - ph.kapp)[tissue] ** 2))
    assert rmse_nls < rmse_wls
    assert np.any(w.has_flag(FitFlag.AT_BOUND) & tissue)  # WLS leaves voxels outside


def test_nls_rician_removes_noise_floor_bias() -> None:
    """FGT-like tissue (high D) at SNR 30: the Rician floor lifts high-b signal and Kapp."""
    rng = np.random.default_rng(7)
    n = 3000
    d, k, s0 = np.full(n, 2.2e-3), np.full(n, 0.4), np.full(n, 1000.0)
    sigma = 1000.0 / 30
    y = rician(dki_signal(s0, d, k, BVALS), sigma, rng)
    nls = dki.fit(y, BVALS, method="nls", sigma=sigma)
    rice = dki.fit(y, BVALS, method="nls_rician", sigma=sigma)
    bias_nls = float(np.median(nls.kapp - 0.4))
    bias_rice = float(np.median(rice.kapp - 0.4))
    assert bias_nls > 0.04  # the bias is real
    assert abs(bias_rice) < 0.3 * bias_nls
    assert abs(bias_rice) < 0.03
    assert rice.settings.sigma == sigma


def test_nls_rician_needs_sigma() -> None:
    y = dki_signal(np.full(4, 1000.0), np.full(4, 1e-3), np.full(4, 0.8), BVALS)
    with pytest.raises(ValueError, match="sigma"):
        dki.fit(y, BVALS, method="nls_rician")


# --------------------------------------------------------------------------- flags


def test_flags() -> None:
    sigma = 10.0
    b = BVALS
    s0 = np.full(4, 1000.0)
    # 0: ordinary tumour voxel; 1: D·K·b_max = 2.4e-3·1.0·2000 ≥ 3 (curve turns up);
    # 2: signal bending the "wrong" way (K < 0) is pinned at K = 0;
    # 3: fast diffusion → signal at b_max below 3σ.
    d = np.array([1.2e-3, 2.4e-3, 1.0e-3, 3.0e-3])
    k = np.array([0.9, 1.0, 0.0, 0.3])
    y = dki_signal(s0, d, k, b)
    y[2] = 1000.0 * np.exp(-b * 1.0e-3 - (b * 1e-3) ** 2 * 0.05)
    y = np.vstack([y, rician(np.zeros((1, b.size)), sigma, np.random.default_rng(0))])
    f = dki.fit(y, b, sigma=sigma)
    flags = [FitFlag(int(v)) for v in f.flags]
    assert flags[0] == FitFlag.NONE
    assert FitFlag.DK_BMAX in flags[1]
    assert FitFlag.AT_BOUND in flags[2] and f.kapp[2] == 0.0
    assert FitFlag.LOW_SIGNAL in flags[3]
    assert flags[4] == FitFlag.BACKGROUND and np.all(f.params[4] == 0)
    counts = f.flag_counts()
    assert counts == {"at_bound": 1, "dk_bmax": 1, "low_signal": 1, "background": 1}


# --------------------------------------------------------------------------- real scanner data


SHARED = Path(__file__).resolve().parents[2] / "shared"
DWI_DIR = SHARED / "data" / "dwi"


def _read_real_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Stack a vendor series into (slices, rows, cols, b) trace images (geometric mean)."""
    import gzip

    import pydicom

    def b_value(ds: pydicom.Dataset, frame: pydicom.Dataset | None) -> float:
        if frame is not None:
            return float(frame.MRDiffusionSequence[0].get("DiffusionBValue", 0.0))
        if "DiffusionBValue" in ds:
            return float(ds.DiffusionBValue)
        if (0x0043, 0x1039) in ds:  # GE: first value, may carry a 1e9 offset
            return float(ds[0x0043, 0x1039].value[0]) % 1e9
        if (0x0019, 0x100C) in ds:  # Siemens classic
            return float(ds[0x0019, 0x100C].value)
        return 0.0

    images: dict[tuple[float, float], list[np.ndarray]] = {}
    for path in sorted((folder / "dicom").rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".gz":
            with gzip.open(path) as fh:
                ds = pydicom.dcmread(fh)
        else:
            ds = pydicom.dcmread(path)
        pix = ds.pixel_array.astype(np.float64)
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
                orient = frame if "PlaneOrientationSequence" in frame else shared
                iop = np.array(orient.PlaneOrientationSequence[0].ImageOrientationPatient, float)
                ipp = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
                pos = float(ipp @ np.cross(iop[:3], iop[3:]))
                key = (float(round(b_value(ds, frame))), round(pos, 2))
                images.setdefault(key, []).append(pix[f])
        else:
            iop = np.array(ds.ImageOrientationPatient, float)
            pos = float(np.array(ds.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]))
            b = b_value(ds, None)
            key = (0.0 if b < 5 else float(round(b)), round(pos, 2))
            images.setdefault(key, []).append(pix)
    bvals = sorted({k[0] for k in images})
    positions = sorted({k[1] for k in images})
    out = np.zeros((len(positions), *next(iter(images.values()))[0].shape, len(bvals)))
    for (b, pos), imgs in images.items():
        stack = np.maximum(np.stack(imgs), 1e-3)
        out[positions.index(pos), :, :, bvals.index(b)] = np.exp(np.log(stack).mean(axis=0))
    return out, np.array(bvals, dtype=float)


@pytest.mark.needs_shared
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "adc_range"),
    [
        # The trimmed GE sample repeats one image in every volume (identical pixel data), so
        # its ADC is exactly 0 — still a real-noise, real-header robustness check.
        ("ge_signa_classic", (-1e-12, 1e-12)),
        ("philips_ingenia_classic", (0.3e-3, 3.5e-3)),
        ("siemens_xa30_enhanced", (0.3e-3, 3.5e-3)),
    ],
)
def test_real_vendor_series(name: str, adc_range: tuple[float, float]) -> None:
    """Real scanner noise: ADC and noise estimate run without warnings; DKI refuses clearly.

    These public series (dcm_qa) carry only b = 0 and one b > 0, so DKI cannot be fitted; the
    model must say so instead of producing numbers (Philips' 0.001–0.004 repeats count as 0).
    """
    if not DWI_DIR.is_dir():
        pytest.skip(f"shared data folder absent: {DWI_DIR}")
    from dicom_node.analysis.adc import fit_adc

    data, bvals = _read_real_series(DWI_DIR / name)
    assert data.ndim == 4 and bvals.size == 2 and bvals[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="at least 3 distinct b-values"):
            DkiModel(bvals)
        adc = fit_adc(data, bvals, adc_bvals=(0.0, float(bvals[-1])))
        sigma = noise.estimate_sigma(data)
        bg = noise.background_mask(data, sigma)
    fg = adc.valid & ~bg
    assert fg.sum() > 0.05 * fg.size
    assert adc_range[0] <= float(np.median(adc.adc[fg])) <= adc_range[1]
    assert np.isfinite(adc.adc).all()


@pytest.mark.needs_shared
def test_real_trace_only_series_is_refused() -> None:
    """A derived TRACEW series with a single b cannot give ADC or DKI: clear errors."""
    if not DWI_DIR.is_dir():
        pytest.skip(f"shared data folder absent: {DWI_DIR}")
    from dicom_node.analysis.adc import fit_adc

    data, bvals = _read_real_series(DWI_DIR / "siemens_xa30_classic_trace")
    assert bvals.tolist() == [2500.0]
    with pytest.raises(ValueError, match="at least 3 distinct b-values"):
        DkiModel(bvals)
    with pytest.raises(ValueError, match="b = 0 or 50"):
        fit_adc(data, bvals)


def test_acquisition_order_does_not_matter() -> None:
    """b-values in any order (and the background test on the lowest b) give the same fit."""
    ph = make_phantom((2, 32, 32), snr=30, seed=8)
    perm = np.array([3, 0, 5, 2, 1, 4])
    ref = dki.fit(ph.signal, BVALS)
    shuffled = dki.fit(ph.signal[..., perm], BVALS[perm])
    np.testing.assert_array_equal(shuffled.flags, ref.flags)
    m = _fitted(ref)
    np.testing.assert_allclose(shuffled.dapp[m], ref.dapp[m], rtol=1e-3, atol=1e-8)
    assert noise.estimate_sigma(ph.signal[..., perm], bvals=BVALS[perm]) == pytest.approx(
        noise.estimate_sigma(ph.signal), rel=1e-9
    )


def test_bessel_approximation_matches_scipy() -> None:
    """The Rician model's polynomial I0e/I1e (Abramowitz & Stegun 9.8.1–4) against scipy."""
    special = pytest.importorskip("scipy.special")
    z = np.concatenate([np.linspace(0, 10, 20001), np.geomspace(10, 1e6, 2001)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        i0, i1 = dki_kernels.bessel_i0e_i1e(z)
        i0f, _ = dki_kernels.bessel_i0e_i1e(z.astype(np.float32))
    np.testing.assert_allclose(i0, special.i0e(z), rtol=1e-6)
    np.testing.assert_allclose(i1, special.i1e(z), rtol=1e-6, atol=1e-7)
    assert i0f.dtype == np.float32
    np.testing.assert_allclose(i0f, special.i0e(z), rtol=2e-6)


def test_sigma_is_a_fit_argument_and_overrides_the_model() -> None:
    rng = np.random.default_rng(5)
    y = rician(
        dki_signal(np.full(50, 1000.0), np.full(50, 1.2e-3), np.full(50, 0.9), BVALS), 30.0, rng
    )
    model = DkiModel(BVALS, method="nls_rician")
    with pytest.raises(ValueError, match="sigma"):
        model.fit(y)  # no background to estimate from
    assert model.fit(y, sigma=30.0).settings.sigma == 30.0
    assert DkiModel(BVALS, sigma=10.0).fit(y, sigma=30.0).settings.sigma == 30.0
    with pytest.raises(ValueError, match="sigma"):
        model.fit(y, sigma=-1.0)


def test_fraction_at_bound_counts_fitted_voxels_only() -> None:
    s0 = np.array([1000.0, 1000.0, 1000.0, 0.0])
    y = dki_signal(
        s0, np.array([1.2e-3, 1.2e-3, 1.2e-3, 1e-3]), np.array([0.9, 0.9, 0.0, 0.5]), BVALS
    )
    f = dki.fit(y, BVALS, sigma=10.0)  # voxel 3 is background, voxel 2 sits at K = 0
    assert f.has_flag(dki.FitFlag.BACKGROUND)[3]
    assert f.fraction_at_bound() == pytest.approx(1 / 3)
    assert f.fraction_at_bound(np.array([True, True, False, True])) == 0.0


def test_cramer_rao_bound_matches_monte_carlo_at_high_snr() -> None:
    """At high SNR the NLS fit is efficient: its spread equals the CRB; Rician → Gaussian."""
    n, sigma = 4000, 1000.0 / 150
    rng = np.random.default_rng(9)
    y = rician(
        dki_signal(np.full(n, 1000.0), np.full(n, 1.2e-3), np.full(n, 0.88), BVALS), sigma, rng
    )
    f = dki.fit(y, BVALS, method="nls_rician", sigma=sigma)
    _, crb_d, crb_k = dki.cramer_rao_bound(1000.0, 1.2e-3, 0.88, BVALS, sigma)
    assert float(np.std(f.kapp)) == pytest.approx(float(crb_k), rel=0.08)
    assert float(np.std(f.dapp)) == pytest.approx(float(crb_d), rel=0.08)
    _, _, gk = dki.cramer_rao_bound(1000.0, 1.2e-3, 0.88, BVALS, sigma, rician=False)
    assert float(gk) == pytest.approx(float(crb_k), rel=1e-3)
    # In the noise floor the Rician information falls: its bound is wider than the Gaussian one.
    _, _, low_k = dki.cramer_rao_bound(1000.0, 2.2e-3, 0.4, BVALS, 1000.0 / 8)
    _, _, low_g = dki.cramer_rao_bound(1000.0, 2.2e-3, 0.4, BVALS, 1000.0 / 8, rician=False)
    assert float(low_k) > 1.05 * float(low_g)
