"""How good is the automatic tumour ROI when the PACS sends no SEG? Dice per lesion type and input.

Run from the repository root:

    .venv/bin/python benchmarks/bench_roi.py                          # 10 seeds, SNR 30 and 15
    .venv/bin/python benchmarks/bench_roi.py --seeds 3 --snr 20       # quick look

For each seed the project's phantom (``dicom_node.synth``, the study writer's default grid
96×192×24 at 1.75×1.75×4 mm and b-values) gets Rician noise (σ = S0(FGT)/SNR), and
``auto_roi`` runs on it as the pipeline calls it (σ estimated from the background, ADC fitted on
the whole series) in three modes, in the same run:

- ``legacy``: the earlier candidate (threshold + largest component), DWI only;
- ``dwi``: the default (hysteresis growing with grouping of nearby foci), DWI only — a study
  that holds nothing else;
- ``dwi+dce+t2w``: the same study with its T2w series (DWI grid, the study writer's noise) and a
  DCE pre/post pair on its own grid (``synth.dce``: 2 mm slices, 1.4× the matrix, noise
  σ = 300/SNR), resampled onto the DWI grid and registration-checked by
  ``analysis.companions.on_dwi_grid`` exactly as the pipeline does.

Dice is against the phantom's tumour mask. Seeds start at 1000, disjoint from the ones
tests/test_auto_roi.py checks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.analysis.adc import fit_adc  # noqa: E402
from dicom_node.analysis.companions import CompanionKind, CompanionSeries, on_dwi_grid  # noqa: E402
from dicom_node.analysis.noise import background_mask, estimate_sigma  # noqa: E402
from dicom_node.analysis.roi import auto_roi  # noqa: E402
from dicom_node.series.volume import DwiVolume, ScalarVolume  # noqa: E402
from dicom_node.synth.dce import dce_series  # noqa: E402
from dicom_node.synth.phantom import (  # noqa: E402
    S0_FGT_NOMINAL,
    LesionType,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from dicom_node.synth.study import DEFAULT_B_VALUES, study_geometry  # noqa: E402

MODES = ("legacy", "dwi", "dwi+dce+t2w")
_T2_FGT = 300.0  # the study writer's T2 noise reference


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Sørensen–Dice overlap (1 = identical; two empty masks count as 0)."""
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 0.0


def run(seeds: list[int], snr: float) -> dict[tuple[str, str], list[float]]:
    """Dice of every mode for every (lesion type, seed)."""
    geometry = study_geometry((96, 192), 24, 4.0, "2.25.1")
    bvals = np.asarray(DEFAULT_B_VALUES, dtype=np.float64)
    out: dict[tuple[str, str], list[float]] = {}
    for lesion in LesionType:
        for seed in seeds:
            ph = make_phantom(geometry, seed=seed, lesion=lesion)
            clean = dki_signal(ph.s0, ph.dapp, ph.kapp, bvals)
            data = add_rician_noise(clean, S0_FGT_NOMINAL / snr, rng_stream(seed, 5))
            sigma = estimate_sigma(data, bvals=bvals)
            adc = fit_adc(data, bvals).adc
            dwi = DwiVolume(
                data=data.astype(np.float32),
                bvals=bvals,
                geometry=geometry,
                study_instance_uid="2.25.2",
                series_instance_uid="2.25.3",
            )
            dce = dce_series(ph, seed=seed, snr=snr)
            t2 = add_rician_noise(ph.t2w, _T2_FGT / snr, rng_stream(seed, 6))
            companions = [
                CompanionSeries(CompanionKind.T2W, ScalarVolume(t2, geometry, "2.25.4")),
                CompanionSeries(
                    CompanionKind.DCE_SUBTRACTION,
                    ScalarVolume(dce.subtraction, dce.geometry, "2.25.5"),
                ),
            ]
            tissue = ~background_mask(data, sigma, bvals=bvals)
            row = []
            for mode in MODES:
                started = time.perf_counter()
                if mode == "dwi+dce+t2w":
                    grid = on_dwi_grid(companions, dwi, tissue)
                    roi = auto_roi(
                        data, bvals, geometry, adc=adc, sigma=sigma,
                        enhancement=grid.enhancement, t2w=grid.t2w, ignored=grid.ignored,
                    )  # fmt: skip
                    if "dce_subtraction" not in roi.inputs:
                        print(f"  DCE not used: {roi.ignored}")
                else:
                    method = "legacy" if mode == "legacy" else "grow"
                    roi = auto_roi(data, bvals, geometry, adc=adc, sigma=sigma, method=method)
                seconds = time.perf_counter() - started
                d = dice(roi.mask, ph.tumour_mask)
                out.setdefault((lesion.value, mode), []).append(d)
                row.append(f"{mode} {d:.3f} ({roi.voxels} vox, {seconds:.2f} s)")
            print(
                f"SNR {snr:g} {lesion.value:4s} seed {seed}: truth {int(ph.tumour_mask.sum())} "
                f"vox ({dce.pattern}); " + "; ".join(row),
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print per-seed Dice and, per SNR, lesion type and mode, median and range."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds per lesion type")
    p.add_argument("--first-seed", type=int, default=1000, help="first seed (tests use < 100)")
    p.add_argument("--snr", type=float, nargs="+", default=[30.0, 15.0])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results = {snr: run(seeds, snr) for snr in args.snr}
    print(f"\nseeds {seeds[0]}–{seeds[-1]} per type ({time.perf_counter() - t0:.0f} s)")
    print(f"{'SNR':>4s} {'type':5s} {'mode':12s} {'median':>7s} {'min':>6s} {'max':>6s}")
    for snr, res in results.items():
        for (lesion, mode), ds in res.items():
            a = np.asarray(ds)
            print(
                f"{snr:4g} {lesion:5s} {mode:12s} {np.median(a):7.3f} {a.min():6.3f} {a.max():6.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
