"""Analysis CPU time of the demo DWI series: old default (``nls``) vs new (MP-PCA + ``nls_rician``).

Writes the synthetic study of ``bench_latency.py`` (40 slices × 96×192, 6 b-values, SNR 30, with
its tumour SEG) with :func:`dicom_node.synth.write_study`, assembles the DWI once and times
:func:`dicom_node.analysis.series_analysis.analyse` (ROI, noise σ, denoising, DKI and ADC fits,
features, QC; the PNG previews only with ``--previews``) with each setting, interleaved, with the
SEG and without it (automatic ROI). The MP-PCA step and the DKI fits are also timed alone on the
same fit region, and DIPY's peer is run in the same process on that region:
``dipy.denoise.localpca.mppca`` on the region's bounding box plus the patch margin, then
``dipy.reconst.msdki`` (its DKI fit for one trace direction).

    .venv/bin/python benchmarks/bench_default_fit.py [--repeats 5] [--slices 40] [--previews]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from dicom_node.analysis.denoise import mppca_region
from dicom_node.analysis.dki import DkiMethod, DkiModel
from dicom_node.analysis.noise import estimate_noise
from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.series.assemble import assemble_dwi
from dicom_node.synth import write_study
from models.contract import DEFAULT_FIT


def _median_time(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median CPU seconds of this process (all threads) over ``repeats`` calls, and the result.

    CPU time, not wall time: on the shared host the load moves wall time by 2-3x between runs.
    """
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = work()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def _read(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--previews", action="store_true", help="also render the PNG previews")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_study(Path(tmp), seed=args.seed, slices=args.slices, matrix=(96, 192))
        dwi = assemble_dwi([pydicom.dcmread(Path(tmp) / f) for f in manifest.dwi.files])
        segs = [pydicom.dcmread(Path(tmp) / f) for f in manifest.seg.files]
    print(f"DWI {dwi.data.shape} (x, y, z, b), b = {dwi.bvals.tolist()}; repeats {args.repeats}")
    old = AnalysisSettings(method=DkiMethod.NLS, denoise="none", previews=args.previews)
    new = AnalysisSettings(
        method=DkiMethod(DEFAULT_FIT.method), denoise=DEFAULT_FIT.denoise, previews=args.previews
    )
    print(f"new default: method {new.method.value}, denoise {new.denoise}")
    rows: list[tuple[str, float, float, int]] = []
    region = None
    for roi_label, roi_segs in (("SEG", segs), ("automatic", [])):
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        for settings in (old, new):
            a = analyse(dwi, segs=roi_segs, settings=settings)  # warm caches
        for _ in range(args.repeats):  # interleaved, so both meet the same load
            for key, settings in (("old", old), ("new", new)):
                t0 = time.process_time()
                analyse(dwi, segs=roi_segs, settings=settings)
                cpu[key].append(time.process_time() - t0)
        rows.append(
            (roi_label, statistics.median(cpu["old"]), statistics.median(cpu["new"]), a.roi.voxels)
        )
        if roi_label == "SEG":
            region = ndimage.binary_dilation(a.roi.mask, iterations=new.roi_margin_voxels)
    print(
        "\n| ROI | nls (old default), CPU s | mppca + nls_rician (new), CPU s | new/old | ROI voxels |"
        "\n|---|---|---|---|---|"
    )
    for roi_label, t_old, t_new, voxels in rows:
        print(f"| {roi_label} | {t_old:.3f} | {t_new:.3f} | {t_new / t_old:.2f} | {voxels} |")

    assert region is not None
    data = dwi.data
    noise = estimate_noise(data, bvals=dwi.bvals)
    sigma = None if noise is None else noise.sigma
    t_noise, _ = _median_time(lambda: estimate_noise(data, bvals=dwi.bvals), args.repeats)
    t_mp, den = _median_time(lambda: mppca_region(data, region), args.repeats)
    model_nls = DkiModel(dwi.bvals, method="nls")
    model_ric = DkiModel(dwi.bvals, method="nls_rician")
    t_nls, _ = _median_time(lambda: model_nls.fit(data, mask=region, sigma=sigma), args.repeats)
    t_ric, _ = _median_time(lambda: model_ric.fit(den, mask=region, sigma=sigma), args.repeats)
    print(f"\nfit region: {int(region.sum())} voxels; σ = {sigma}")
    print("| step (ours) | CPU s (median) |\n|---|---|")
    print(f"| noise σ (background) | {t_noise:.3f} |")
    print(f"| MP-PCA of the region's box | {t_mp:.3f} |")
    print(f"| nls fit of the region | {t_nls:.3f} |")
    print(f"| nls_rician fit of the denoised region | {t_ric:.3f} |")

    try:
        from dipy.core.gradients import gradient_table
        from dipy.denoise.localpca import mppca as dipy_mppca
        from dipy.reconst import msdki
    except ImportError:  # pragma: no cover - DIPY is a test/benchmark extra
        print("DIPY not installed: no peer timing")
        return 0
    r = 2
    grown = ndimage.binary_dilation(region, iterations=r)
    idx = np.argwhere(grown)
    lo = np.maximum(idx.min(axis=0) - r, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + r, data.shape[:3])
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    bvecs = np.tile([1.0, 0.0, 0.0], (dwi.bvals.size, 1))
    bvecs[dwi.bvals < 5] = 0.0
    gtab = gradient_table(dwi.bvals, bvecs=bvecs, b0_threshold=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_dmp, dden = _median_time(
            lambda: dipy_mppca(data[box], mask=grown[box], patch_radius=r),
            max(1, args.repeats // 2),
        )
        model = msdki.MeanDiffusionKurtosisModel(gtab, bmag=1)
        t_dfit, _ = _median_time(
            lambda: model.fit(dden, mask=region[box]), max(1, args.repeats // 2)
        )
    print(f"| DIPY mppca of the same box {tuple(b.stop - b.start for b in box)} | {t_dmp:.3f} |")
    print(f"| DIPY msdki fit of the region | {t_dfit:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
