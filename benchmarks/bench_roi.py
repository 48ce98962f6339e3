"""How good is the automatic tumour ROI when the PACS sends no SEG? Dice per lesion type.

Run from the repository root:

    .venv/bin/python benchmarks/bench_roi.py                      # 10 seeds per type, SNR 30
    .venv/bin/python benchmarks/bench_roi.py --seeds 3 --snr 20   # quick look

For each seed the project's phantom (``dicom_node.synth``, the study writer's default grid
96×192×24 at 1.75×1.75×4 mm and b-values) gets Rician noise (σ = S0(FGT)/SNR), and
``auto_roi`` runs on it as the pipeline calls it (σ estimated from the background, ADC fitted
on the whole series) with the legacy method (threshold + largest component) and the default
(hysteresis growing with grouping of nearby foci). Dice is against the phantom's tumour mask.
Seeds start at 1000, disjoint from the ones tests/test_auto_roi.py checks.
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

from dicom_node.analysis.roi import auto_roi  # noqa: E402
from dicom_node.synth.phantom import (  # noqa: E402
    S0_FGT_NOMINAL,
    LesionType,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from dicom_node.synth.study import DEFAULT_B_VALUES, study_geometry  # noqa: E402

METHODS = ("legacy", "grow")


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Sørensen–Dice overlap (1 = identical; two empty masks count as 0)."""
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 0.0


def run(seeds: list[int], snr: float) -> dict[tuple[str, str], list[float]]:
    """Dice of every method for every (lesion type, seed)."""
    geometry = study_geometry((96, 192), 24, 4.0, "2.25.1")
    bvals = np.asarray(DEFAULT_B_VALUES, dtype=np.float64)
    out: dict[tuple[str, str], list[float]] = {}
    for lesion in LesionType:
        for seed in seeds:
            ph = make_phantom(geometry, seed=seed, lesion=lesion)
            clean = dki_signal(ph.s0, ph.dapp, ph.kapp, bvals)
            data = add_rician_noise(clean, S0_FGT_NOMINAL / snr, rng_stream(seed, 5))
            row = []
            for method in METHODS:
                roi = auto_roi(data, bvals, geometry, method=method)
                d = dice(roi.mask, ph.tumour_mask)
                out.setdefault((lesion.value, method), []).append(d)
                row.append(f"{method} {d:.3f} ({roi.voxels} vox)")
            print(
                f"{lesion.value:4s} seed {seed}: truth {int(ph.tumour_mask.sum())} vox; "
                + "; ".join(row)
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print per-seed Dice and, per lesion type and method, median and range."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds per lesion type (from 1000)")
    p.add_argument("--snr", type=float, default=30.0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(list(range(1000, 1000 + args.seeds)), args.snr)
    print(f"\nSNR {args.snr:g}, {args.seeds} seeds per type ({time.perf_counter() - t0:.0f} s)")
    print(f"{'type':5s} {'method':7s} {'median':>7s} {'min':>6s} {'max':>6s}")
    for (lesion, method), ds in res.items():
        a = np.asarray(ds)
        print(f"{lesion:5s} {method:7s} {np.median(a):7.3f} {a.min():6.3f} {a.max():6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
