"""Noise σ from the background, and the coil count in the noise-floor-aware fit (issue 12).

Run from the repository root:

    .venv/bin/python benchmarks/bench_noise.py                  # SNR 10, 20, 30, 60; 4 seeds
    .venv/bin/python benchmarks/bench_noise.py --seeds 1        # quick look

Section 1 — σ on the project's phantom (``dicom_node.synth``: air, lungs, suppressed fat with
S0 = 30, muscle, FGT, a mass), Rician noise with σ = S0(FGT)/SNR (the study writer's
definition): the signed error of ``estimate_noise`` (what the pipeline records in
``provenance.noise``) per SNR over the seeds, and as a cross-check the median MP-PCA σ
(Veraart 2016, ``dicom_node.analysis.denoise.mppca``) in the tumour and its margin.
Section 2 — the same phantom as the sum of squares of N complex Gaussian channels: σ and the
effective coil count N from the background. Section 3 — ``nls_rician`` on tumour-like voxels
(D 0.9–1.6 ×10⁻³ mm²/s, K 0.6–0.95, S0 1000) from N-channel sum-of-squares data: the median
Kapp and Dapp error with the Rician (N = 1) noise floor against the non-central χ floor of N
coils, and the throughput of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.analysis.denoise import mppca  # noqa: E402
from dicom_node.analysis.dki import DkiModel  # noqa: E402
from dicom_node.analysis.noise import estimate_noise  # noqa: E402
from dicom_node.synth.phantom import (  # noqa: E402
    S0_FGT_NOMINAL,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from dicom_node.synth.study import study_geometry  # noqa: E402

BVALS = np.array([0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0])


def sos(clean: NDArray[np.float64], sigma: float, coils: int, seed: int) -> NDArray[np.float64]:
    """Sum-of-squares magnitude of ``coils`` complex Gaussian channels, the signal on one."""
    if coils == 1:
        return add_rician_noise(clean, sigma, rng_stream(seed, 5))
    rng = np.random.default_rng(seed)
    acc = np.zeros(clean.shape)
    for c in range(coils):
        acc += (rng.normal(0.0, sigma, clean.shape) + (clean if c == 0 else 0.0)) ** 2
        acc += rng.normal(0.0, sigma, clean.shape) ** 2
    return np.sqrt(acc)


def phantom(seed: int, args: argparse.Namespace) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    geometry = study_geometry(tuple(args.matrix), args.slices, 3.0, "1.2.826.0.1.3680043.10.1389.1")
    ph = make_phantom(geometry, seed=seed, lesion="mass")
    return dki_signal(ph.s0, ph.dapp, ph.kapp, BVALS), ph.tumour_mask


def mppca_sigma(noisy: NDArray[np.float64], tumour: NDArray[np.bool_]) -> float:
    """Median MP-PCA σ over the tumour and a 3-voxel margin (a cross-check in tissue)."""
    region = ndimage.binary_dilation(tumour, iterations=3)
    idx = np.argwhere(ndimage.binary_dilation(region, iterations=3))
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return mppca(noisy[box], mask=region[box]).sigma_median


def section_sigma(args: argparse.Namespace) -> None:
    print("## 1. σ on the phantom (Rician), signed error in %: mean [min, max] over seeds\n")
    print("| SNR | background σ (estimate_noise) | method | MP-PCA σ in tissue | time (s) |")
    print("|---|---|---|---|---|")
    clean = [phantom(seed, args) for seed in range(args.seeds)]
    for snr in args.snr:
        sigma = S0_FGT_NOMINAL / snr
        errs, mp, times, methods = [], [], [], set()
        for seed, (signal, tumour) in enumerate(clean):
            noisy = sos(signal, sigma, 1, seed)
            t0 = time.perf_counter()
            est = estimate_noise(noisy, bvals=BVALS)
            times.append(time.perf_counter() - t0)
            errs.append(np.nan if est is None else 100.0 * (est.sigma / sigma - 1.0))
            methods.add("none" if est is None else est.method.value)
            if not args.no_mppca:
                mp.append(100.0 * (mppca_sigma(noisy, tumour) / sigma - 1.0))
        e = np.asarray(errs)
        mp_txt = f"{np.mean(mp):+.1f} %" if mp else "–"
        print(
            f"| {snr:g} | {np.nanmean(e):+.2f} [{np.nanmin(e):+.2f}, {np.nanmax(e):+.2f}] | "
            f"{', '.join(sorted(methods))} | {mp_txt} | {np.median(times):.2f} |"
        )


def section_coils(args: argparse.Namespace) -> None:
    print("\n## 2. Multi-coil (sum of squares) phantom: σ error and N from the background\n")
    print("| N | SNR | σ error (%) | N estimated | method |")
    print("|---|---|---|---|---|")
    signal, _ = phantom(0, args)
    for coils in args.coils:
        for snr in (20.0, 60.0):
            sigma = S0_FGT_NOMINAL / snr
            est = estimate_noise(sos(signal, sigma, coils, seed=coils), bvals=BVALS)
            if est is None:
                print(f"| {coils} | {snr:g} | none | – | – |")
                continue
            print(
                f"| {coils} | {snr:g} | {100.0 * (est.sigma / sigma - 1.0):+.2f} | "
                f"{est.effective_coils:g} | {est.method.value} |"
            )


def section_fit(args: argparse.Namespace) -> None:
    print(
        "\n## 3. nls_rician on N-coil data: median error (%) with the N = 1 and the N-coil model\n"
    )
    print(
        "| N | SNR | Kapp, N = 1 | Kapp, N coils | Dapp, N = 1 | Dapp, N coils | voxels/s N = 1 | voxels/s N coils |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    m = args.voxels
    d = rng.uniform(0.9e-3, 1.6e-3, m)
    k = rng.uniform(0.6, 0.95, m)
    bd = BVALS[None, :] * d[:, None]
    clean = 1000.0 * np.exp(-bd + bd * bd * k[:, None] / 6.0)
    model = DkiModel(BVALS, method="nls_rician")
    for coils in args.coils:
        for snr in (20.0, 30.0):
            sigma = 1000.0 / snr
            y = sos(clean, sigma, coils, seed=100 + coils)
            row = []
            for n_model in sorted({1.0, float(coils)}):
                t0 = time.perf_counter()
                fit = model.fit(y, sigma=sigma, coils=n_model)
                rate = m / (time.perf_counter() - t0)
                row.append(
                    (
                        100.0 * float(np.median(fit.kapp / k - 1.0)),
                        100.0 * float(np.median(fit.dapp / d - 1.0)),
                        rate,
                    )
                )
            (k1, d1, r1), (kn, dn, rn) = row[0], row[-1]  # N = 1: one fit, the same path
            print(
                f"| {coils} | {snr:g} | {k1:+.1f} | {kn:+.1f} | {d1:+.1f} | {dn:+.1f} | "
                f"{r1 / 1e3:.0f} k | {rn / 1e3:.0f} k |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0, 30.0, 60.0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--matrix", type=int, nargs=2, default=(128, 256), metavar=("ROWS", "COLS"))
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--coils", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--voxels", type=int, default=50_000)
    ap.add_argument("--no-mppca", action="store_true")
    args = ap.parse_args()
    print(
        f"# Noise σ and coil count — matrix {tuple(args.matrix)}, {args.slices} slices, b = "
        f"{BVALS.astype(int).tolist()}, seeds 0..{args.seeds - 1}; host {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}\n"
    )
    section_sigma(args)
    section_coils(args)
    section_fit(args)


if __name__ == "__main__":
    main()
