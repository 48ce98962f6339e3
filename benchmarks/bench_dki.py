"""Benchmark of the DKI fits against DIPY's msdki on one synthetic breast-like volume.

Run from the repository root:

    .venv/bin/python benchmarks/bench_dki.py            # 256x256x40, SNR 30 (the issue's setup)

Prints a Markdown report: voxels/s, Dapp/Kapp RMSE against the truth and beside the Cramér–Rao
bound (Rician and Gaussian Fisher information at the true parameters), out-of-bound voxels, peak
traced memory, the time to read the data once (memory floor) and ratios to DIPY. DIPY loops
over voxels in Python, so it is timed on a random subset of the fitted voxels (``--dipy-voxels``)
and its throughput is extrapolated; our fits run on every voxel of the volume.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _dki_phantom import Tissue, make_phantom  # noqa: E402

from dicom_node.analysis import dki, noise  # noqa: E402
from dicom_node.analysis.adc import fit_adc  # noqa: E402
from dicom_node.analysis.features import map_features  # noqa: E402

BVALS = np.array([0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0])


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall and CPU seconds over ``repeats`` calls, and the last result."""
    wall, cpu, out = np.inf, np.inf, None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, out


def _peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def _rmse(est: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((est - truth) ** 2)))


def _rms_crb(ph: Any, sel: np.ndarray, sigma: float, rician: bool) -> tuple[float, float]:
    """RMS over the voxels ``sel`` of the per-voxel CRB of Dapp and Kapp at their true values."""
    idx = np.flatnonzero(sel)[:: max(1, int(sel.sum()) // 20000)]
    s0, d, k = (np.asarray(v).ravel()[idx] for v in (ph.s0, ph.dapp, ph.kapp))
    _, cd, ck = dki.cramer_rao_bound(s0, d, k, BVALS, sigma, rician=rician)
    return float(np.sqrt(np.mean(cd**2))), float(np.sqrt(np.mean(ck**2)))


def _print_crb(
    ph: Any, *, sigma_true: float, tissue: np.ndarray, tumour: np.ndarray, rows: list[Any]
) -> None:
    """RMSE beside the Cramér–Rao bound (Rician and Gaussian Fisher information)."""
    crb = {
        (name, rician): _rms_crb(ph, sel, sigma_true, rician)
        for name, sel in (("FGT+tumour", tissue), ("tumour", tumour))
        for rician in (True, False)
    }
    print(
        "\nCramér–Rao bound at the phantom's true parameters and b-values (RMS over the "
        "voxels of the per-voxel bound, σ true):\n"
    )
    print("| voxels | Dapp CRB Rician | Dapp CRB Gaussian | Kapp CRB Rician | Kapp CRB Gaussian |")
    print("|---|---|---|---|---|")
    for name in ("FGT+tumour", "tumour"):
        (dr, kr), (dg, kg) = crb[(name, True)], crb[(name, False)]
        print(f"| {name} | {dr * 1e3:.4f} | {dg * 1e3:.4f} | {kr:.4f} | {kg:.4f} |")
    print("\n| method | Dapp RMSE / CRB (FGT+tumour) | Kapp RMSE / CRB (FGT+tumour) | "
          "Kapp RMSE / CRB (tumour) |")  # fmt: skip
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['d_rmse'] / crb[('FGT+tumour', True)][0]:.2f} | "
            f"{r['k_rmse'] / crb[('FGT+tumour', True)][1]:.2f} | "
            f"{r['k_rmse_tumour'] / crb[('tumour', True)][1]:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dipy-voxels", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    ph = make_phantom(tuple(args.shape), snr=args.snr, seed=args.seed)
    data = ph.signal
    n_total = int(np.prod(ph.tissue.shape))
    print("# DKI fit benchmark\n")
    print(
        f"- volume {tuple(args.shape)} = {n_total} voxels, b = {BVALS.astype(int).tolist()}, "
        f"SNR {args.snr:g} (S0 of FGT / σ), Rician noise, seed {args.seed}"
    )
    mix = {t.name.lower(): f"{(ph.tissue == t).mean():.1%}" for t in Tissue}
    print(f"- tissue mix: {mix}")
    print(f"- host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}; numpy {np.__version__}")  # fmt: skip

    floor, _, _ = _best(lambda: float(np.sum(data)), args.repeats)
    print(f"- read the data once (np.sum over {data.nbytes / 2**20:.0f} MiB): {floor * 1e3:.1f} ms")
    sig_wall, _, sigma = _best(lambda: noise.estimate_sigma(data), args.repeats)
    print(
        f"- σ estimate {sigma:.2f} (truth {ph.sigma:.2f}) in {sig_wall * 1e3:.0f} ms; the fits "
        "below are given this σ (the whole-pipeline line at the end estimates it itself)\n"
    )

    truth_d, truth_k = ph.dapp, ph.kapp
    tissue = np.isin(ph.tissue, [Tissue.FGT, Tissue.TUMOUR])
    tumour = ph.tissue == Tissue.TUMOUR

    # DIPY reference on a random subset of the voxels we fit.
    rows: list[dict[str, Any]] = []
    fg = ~noise.background_mask(data, sigma)
    rng = np.random.default_rng(1)
    fg_idx = np.flatnonzero(fg)
    n_fit = fg_idx.size
    sub = np.sort(rng.choice(fg_idx, size=min(args.dipy_voxels, n_fit), replace=False))
    dipy_rate = None
    dipy_sub_k = None
    try:
        from dipy.core.gradients import gradient_table
        from dipy.reconst import msdki

        bvecs = np.zeros((BVALS.size, 3))
        bvecs[BVALS > 0, 0] = 1.0
        gtab = gradient_table(BVALS, bvecs=bvecs, b0_threshold=0)
        model = msdki.MeanDiffusionKurtosisModel(gtab, bmag=1)
        block = data.reshape(-1, BVALS.size)[sub].astype(np.float64)
        wall, cpu, ref = _best(lambda: model.fit(block), 2)
        dipy_rate = sub.size / wall
        dipy_sub_k = ref.msk
        d_sub, k_sub = truth_d.ravel()[sub], truth_k.ravel()[sub]
        t_sub = tissue.ravel()[sub]
        out_b = int(np.sum((ref.msd <= 0) | (ref.msd > 3.5e-3) | (ref.msk < 0) | (ref.msk > 3)))
        rows.append(
            {
                "method": f"DIPY msdki (subset of {sub.size})",
                "wall": wall,
                "cpu": cpu,
                "rate": dipy_rate,
                "cpu_rate": sub.size / cpu,
                "d_rmse": _rmse(ref.msd[t_sub], d_sub[t_sub]),
                "k_rmse": _rmse(ref.msk[t_sub], k_sub[t_sub]),
                "k_rmse_tumour": _rmse(ref.msk[tumour.ravel()[sub]], k_sub[tumour.ravel()[sub]]),
                "oob": f"{out_b} ({out_b / sub.size:.1%})",
                "peak": _peak_mib(lambda: model.fit(block)),
                "whole": n_fit / dipy_rate,
            }
        )
    except ImportError:
        print("DIPY not installed: no reference row\n")

    fits: dict[str, dki.DkiFit] = {}
    for method in ("wls", "nls", "nls_rician"):
        model_ours = dki.DkiModel(BVALS, method=method)
        run = functools.partial(model_ours.fit, data, sigma=sigma)
        wall, cpu, f = _best(run, args.repeats)
        fits[method] = f
        fitted = (f.flags & dki.FitFlag.BACKGROUND) == 0
        sel = tissue & fitted
        oob = int(
            np.sum(((f.dapp <= 0) | (f.dapp > 3.5e-3) | (f.kapp < 0) | (f.kapp > 3)) & fitted)
        )
        rows.append(
            {
                "method": f"ours {method}",
                "wall": wall,
                "cpu": cpu,
                "rate": int(fitted.sum()) / wall,
                "cpu_rate": int(fitted.sum()) / cpu,
                "d_rmse": _rmse(f.dapp[sel], truth_d[sel]),
                "k_rmse": _rmse(f.kapp[sel], truth_k[sel]),
                "k_rmse_tumour": _rmse(f.kapp[tumour & fitted], truth_k[tumour & fitted]),
                "oob": f"{oob} ({oob / max(int(fitted.sum()), 1):.1%})",
                "peak": _peak_mib(run),
                "whole": wall,
                "sub_k_rmse": _rmse(
                    f.kapp.ravel()[sub][tissue.ravel()[sub]],
                    truth_k.ravel()[sub][tissue.ravel()[sub]],
                ),
            }
        )

    print(f"Fitted (non-background) voxels: {n_fit} of {n_total}.\n")
    print(
        "| method | wall s (whole volume) | CPU s | fitted voxels/s (wall) | × DIPY (wall) "
        "| voxels/CPU-s | × DIPY (CPU) | Dapp RMSE "
        "(10⁻³ mm²/s, FGT+tumour) | Kapp RMSE (FGT+tumour) | Kapp RMSE (tumour) | "
        "out of bounds | peak traced MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['rate'] / dipy_rate:.0f}×" if dipy_rate else "–"
        dipy_cpu = rows[0]["cpu_rate"] if dipy_rate else None
        cratio = f"{r['cpu_rate'] / dipy_cpu:.0f}×" if dipy_cpu else "–"
        whole = f"{r['whole']:.3f}" + (" (extrapolated)" if "DIPY" in r["method"] else "")
        print(
            f"| {r['method']} | {whole} | {r['cpu']:.3f} | {r['rate']:,.0f} | {ratio} | "
            f"{r['cpu_rate']:,.0f} | {cratio} | "
            f"{r['d_rmse'] * 1e3:.3f} | {r['k_rmse']:.3f} | {r['k_rmse_tumour']:.3f} | "
            f"{r['oob']} | {r['peak']:.0f} |"
        )
    if dipy_sub_k is not None:
        print("\nKapp RMSE on DIPY's subset (same voxels):", end=" ")
        print(", ".join(f"{r['method']} {r['sub_k_rmse']:.3f}" for r in rows if "sub_k_rmse" in r))

    _print_crb(ph, sigma_true=ph.sigma, tissue=tissue, tumour=tumour, rows=rows)

    # Fit plus features of the whole breast volume (every non-background voxel).
    def pipeline() -> dict[str, float]:
        f = dki.DkiModel(BVALS, method="nls").fit(data)
        adc = fit_adc(data, BVALS)
        mf = map_features(
            {"adc": adc.adc, "dapp": f.dapp, "kapp": f.kapp},
            tumour,
            voxel_volume_mm3=16.0,
            valid={"adc": adc.valid},
            flags=f.flags,
        )
        return mf.features

    wall, cpu, feats = _best(pipeline, args.repeats)
    print(
        f"\nWhole-volume `nls` fit + ADC + 21 features: {wall:.3f} s wall, {cpu:.3f} s CPU "
        f"(goal < 1 s); tumour dapp_mean {feats['dapp_mean'] * 1e3:.3f} "
        f"(truth {truth_d[tumour].mean() * 1e3:.3f}) ×10⁻³ mm²/s, kapp_mean "
        f"{feats['kapp_mean']:.3f} (truth {truth_k[tumour].mean():.3f})"
    )
    print(f"Load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
