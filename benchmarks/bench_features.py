"""Do the 21 histogram features survive the scanner's noise? Every fit method, one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_features.py                 # SNR 10, 20, 30, 60; 4 seeds
    .venv/bin/python benchmarks/bench_features.py --seeds 1 --snr 20   # quick look

For each seed the project's phantom (``dicom_node.synth``, a mass with a necrotic core: Dapp ×1.5,
Kapp ×0.65 in its inner half) gets Rician noise at each SNR (σ = S0(FGT)/SNR, the study writer's
definition). σ is estimated from the air background of the whole volume, as the pipeline does;
the fits run on the tumour plus a 3-voxel margin. Methods: ours (``wls``, ``nls`` = the dki-1
default, ``nls_rician``), each without and with our MP-PCA (``dicom_node.analysis.denoise``;
``nls_rician`` + MP-PCA is the default since dki-2, ``models.contract.DEFAULT_FIT``), and
DIPY's ``msdki`` without and with DIPY's ``mppca``. The reference is the features of the
noise-free maps (truth Dapp/Kapp; ADC fitted on the noise-free signal). Printed per SNR: the
signed error of every feature averaged over the seeds (location features in %, skewness,
kurtosis and entropy as differences), the voxels at a bound, and whether the core/rim contrast
of Dapp and Kapp survives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.analysis.adc import fit_adc  # noqa: E402
from dicom_node.analysis.denoise import mppca_region  # noqa: E402
from dicom_node.analysis.dki import DkiModel, FitFlag  # noqa: E402
from dicom_node.analysis.features import FEATURE_NAMES, map_features  # noqa: E402
from dicom_node.analysis.noise import estimate_noise  # noqa: E402
from dicom_node.synth.phantom import (  # noqa: E402
    S0_FGT_NOMINAL,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from dicom_node.synth.study import study_geometry  # noqa: E402
from models.contract import DEFAULT_FIT, LEGACY_FIT  # noqa: E402

BVALS = np.array([0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0])
OURS = [(m, d) for d in ("none", "mppca") for m in ("wls", "nls", "nls_rician")]
DIPY = [("dipy_msdki", "none"), ("dipy_msdki", "dipy_mppca")]
LOCATION = ("mean", "median", "p5", "p95")
DEFAULT = f"{DEFAULT_FIT.method}/{DEFAULT_FIT.denoise}"
LEGACY = f"{LEGACY_FIT.method}/{LEGACY_FIT.denoise}"


@dataclass
class Case:
    """One phantom at one SNR: the crop around the tumour and its truth."""

    noisy: NDArray[np.float64]
    clean: NDArray[np.float64]
    tumour: NDArray[np.bool_]
    core: NDArray[np.bool_]
    region: NDArray[np.bool_]
    sigma: float
    sigma_true: float
    coils: float
    dapp: NDArray[np.float64]
    kapp: NDArray[np.float64]
    voxel_ml: float


def make_case(seed: int, snr: float, matrix: tuple[int, int], slices: int, thick: float) -> Case:
    geometry = study_geometry(matrix, slices, thick, "1.2.826.0.1.3680043.10.1389.1")
    ph = make_phantom(geometry, seed=seed, lesion="mass", necrotic_core=True)
    clean = dki_signal(ph.s0, ph.dapp, ph.kapp, BVALS)
    sigma_true = S0_FGT_NOMINAL / snr
    noisy = add_rician_noise(clean, sigma_true, rng_stream(seed, 5))
    est = estimate_noise(noisy, bvals=BVALS)
    assert est is not None, "no background for σ"
    tumour = ph.tumour_mask
    region = ndimage.binary_dilation(tumour, iterations=3) | tumour
    grown = ndimage.binary_dilation(region, iterations=4)
    idx = np.argwhere(grown)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    core = ph.core if ph.core is not None else np.zeros_like(tumour)
    return Case(
        noisy=noisy[sl],
        clean=clean[sl],
        tumour=tumour[sl],
        core=core[sl] & tumour[sl],
        region=region[sl],
        sigma=est.sigma,
        sigma_true=sigma_true,
        coils=est.effective_coils,
        dapp=ph.dapp[sl],
        kapp=ph.kapp[sl],
        voxel_ml=geometry.voxel_volume_mm3 / 1000.0,
    )


def features(case: Case, maps: dict[str, NDArray[np.float64]], valid: Any) -> dict[str, float]:
    mf = map_features(maps, case.tumour, voxel_volume_mm3=case.voxel_ml * 1000.0, valid=valid)
    return {k: mf.features[k] for k in FEATURE_NAMES}


def core_rim(case: Case, m: NDArray[np.float64]) -> float:
    rim = case.tumour & ~case.core
    return float(m[case.core].mean() - m[rim].mean()) if case.core.any() and rim.any() else 0.0


def run_ours(case: Case, method: str, denoise: str) -> tuple[dict[str, Any], float]:
    data = case.noisy
    if denoise == "mppca":
        den = mppca_region(data, case.region)
        assert den is not None
        data = den
    adc = fit_adc(data, BVALS)
    fit = DkiModel(BVALS, method=method).fit(data, mask=case.region, sigma=case.sigma)
    maps = {"adc": adc.adc, "dapp": fit.dapp, "kapp": fit.kapp}
    at_bound = fit.fraction_at_bound(case.tumour)
    return {"maps": maps, "valid": {"adc": adc.valid}, "bg": fit.has_flag(FitFlag.BACKGROUND)}, (
        at_bound
    )


def run_dipy(case: Case, denoise: str) -> tuple[dict[str, Any], float]:
    from dipy.core.gradients import gradient_table
    from dipy.denoise.localpca import mppca as dipy_mppca
    from dipy.reconst import msdki

    data = case.noisy
    if denoise == "dipy_mppca":
        grown = ndimage.binary_dilation(case.region, iterations=2)
        den = dipy_mppca(data, mask=grown, patch_radius=2, suppress_warning=True)
        data = np.where(case.region[..., None], den, data)
    bvecs = np.zeros((BVALS.size, 3))
    bvecs[BVALS > 0, 0] = 1.0
    gtab = gradient_table(BVALS, bvecs=bvecs, b0_threshold=0)
    model = msdki.MeanDiffusionKurtosisModel(gtab, bmag=1)
    d = np.zeros(case.tumour.shape)
    k = np.zeros(case.tumour.shape)
    fit = model.fit(data[case.region])
    d[case.region], k[case.region] = fit.msd, fit.msk
    adc = fit_adc(data, BVALS)
    out_of_box = ((d <= 0) | (d > 3.5e-3) | (k <= 0) | (k >= 3.0)) & case.tumour
    maps = {"adc": adc.adc, "dapp": d, "kapp": k}
    return {"maps": maps, "valid": {"adc": adc.valid}}, float(out_of_box.sum() / case.tumour.sum())


def error(name: str, est: float, ref: float) -> float:
    """Location features: relative error in %; shape features and entropy: difference."""
    if name.split("_", 1)[1] in LOCATION:
        return 100.0 * (est - ref) / ref
    return est - ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0, 30.0, 60.0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--matrix", type=int, nargs=2, default=(128, 256), metavar=("ROWS", "COLS"))
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--thickness", type=float, default=3.0)
    ap.add_argument("--no-dipy", action="store_true")
    args = ap.parse_args()
    methods = OURS + ([] if args.no_dipy else DIPY)
    labels = [f"{m}/{d}" for m, d in methods]
    t0 = time.perf_counter()
    print("# Histogram features against the noise-free maps\n")
    print(
        f"- phantom: mass with necrotic core, matrix {tuple(args.matrix)}, {args.slices} slices "
        f"of {args.thickness:g} mm, b = {BVALS.astype(int).tolist()}, seeds 0..{args.seeds - 1}, "
        f"Rician noise; host {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(
        "- errors are the mean over seeds: location features (mean/median/P5/P95) in % of the "
        "noise-free value; skewness, excess kurtosis (IBSI) and entropy (bits) as differences"
    )
    print(
        f"- `{DEFAULT}` is today's default (contract DEFAULT_FIT, pipeline dki-2); `{LEGACY}` "
        "the dki-1 default and today's fallback where σ cannot be estimated\n"
    )
    summary: list[str] = []
    for snr in args.snr:
        errs: dict[str, list[dict[str, float]]] = {lab: [] for lab in labels}
        bound: dict[str, list[float]] = {lab: [] for lab in labels}
        contrast: dict[str, list[tuple[float, float]]] = {lab: [] for lab in labels}
        sig_err, voxels, core_vox = [], [], []
        for seed in range(args.seeds):
            case = make_case(seed, snr, tuple(args.matrix), args.slices, args.thickness)
            sig_err.append(100.0 * (case.sigma / case.sigma_true - 1.0))
            voxels.append(int(case.tumour.sum()))
            core_vox.append(int(case.core.sum()))
            ref_adc = fit_adc(case.clean, BVALS)
            ref = features(
                case,
                {"adc": ref_adc.adc, "dapp": case.dapp, "kapp": case.kapp},
                {"adc": ref_adc.valid},
            )
            ref_cr = (core_rim(case, case.dapp), core_rim(case, case.kapp))
            for (m, d), lab in zip(methods, labels, strict=True):
                res, frac = run_dipy(case, d) if m == "dipy_msdki" else run_ours(case, m, d)
                f = features(case, res["maps"], res["valid"])
                errs[lab].append({k: error(k, f[k], ref[k]) for k in FEATURE_NAMES})
                bound[lab].append(100.0 * frac)
                cr = (core_rim(case, res["maps"]["dapp"]), core_rim(case, res["maps"]["kapp"]))
                contrast[lab].append(
                    (100.0 * (cr[0] / ref_cr[0] - 1.0), 100.0 * (cr[1] / ref_cr[1] - 1.0))
                )
        print(
            f"## SNR {snr:g}\n\n- σ estimate error {np.mean(sig_err):+.1f} % (mean over seeds), "
            f"tumour {np.mean(voxels):.0f} voxels of which core {np.mean(core_vox):.0f}\n"
        )
        print("| feature | " + " | ".join(labels) + " |")
        print("|---" * (len(labels) + 1) + "|")
        mean_err = {lab: {k: float(np.mean([e[k] for e in errs[lab]])) for k in FEATURE_NAMES}
                    for lab in labels}  # fmt: skip
        for k in FEATURE_NAMES:
            unit = " %" if k.split("_", 1)[1] in LOCATION else ""
            print(
                f"| {k}{unit} | " + " | ".join(f"{mean_err[lab][k]:+.2f}" for lab in labels) + " |"
            )
        print("| **max abs mean/median %** | " + " | ".join(
            f"**{max(abs(mean_err[lab][k]) for k in FEATURE_NAMES if k.endswith(('_mean', '_median'))):.2f}**"
            for lab in labels) + " |")  # fmt: skip
        print("| voxels at a bound % | " + " | ".join(
            f"{np.mean(bound[lab]):.2f}" for lab in labels) + " |")  # fmt: skip
        print("| core−rim ΔDapp error % | " + " | ".join(
            f"{np.mean([c[0] for c in contrast[lab]]):+.1f}" for lab in labels) + " |")  # fmt: skip
        print("| core−rim ΔKapp error % | " + " | ".join(
            f"{np.mean([c[1] for c in contrast[lab]]):+.1f}" for lab in labels) + " |")  # fmt: skip
        shape_keys = [k for k in FEATURE_NAMES if k.split("_", 1)[1] not in ("mean", "median")]
        for lab in labels:
            mm = max(
                abs(mean_err[lab][k]) for k in FEATURE_NAMES if k.endswith(("_mean", "_median"))
            )
            summary.append(
                f"| {snr:g} | {lab} | {mm:.2f} | {np.mean(bound[lab]):.2f} | "
                f"{np.mean([abs(mean_err[lab][k]) for k in shape_keys if k.endswith(('_p5', '_p95'))]):.2f} | "
                f"{np.mean([abs(mean_err[lab][k]) for k in shape_keys if not k.endswith(('_p5', '_p95'))]):.3f} | "
                f"{np.mean([c[0] for c in contrast[lab]]):+.1f} |"
            )  # fmt: skip
        print()
    print("## Summary\n")
    print(
        "| SNR | method | max abs mean/median err % | at bound % | mean abs P5/P95 err % | "
        "mean abs skew/kurt/entropy err | core−rim ΔDapp err % |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(summary))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
