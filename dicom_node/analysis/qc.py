"""QC metrics of one analysis, carried in ``provenance.qc`` for the service's QC gate.

The node only measures; the thresholds live with the service (``cds_qc_*`` settings), so a site
can tighten them without re-analysing. Two metrics need more than the fit's flag counts:

* the SNR at the highest b: the ROI's mean signal in the most diffusion-weighted image over the
  noise σ. Kapp is read from the curvature there; near the noise floor it is biased (the
  dki-and-features notes), whatever the fit method.
* the fit residual: per fitted ROI voxel, the RMS difference between the b-level signals and the
  fitted DKI curve S0·exp(−bD + b²D²K/6), over S0; the median over the ROI. It grows when the
  signal does not follow the model (motion between b-values, misregistration, artefacts).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicom_node.analysis.dki import DkiFit, FitFlag
from dicom_node.series.bvalues import bvalue_levels

__all__ = ["fit_residual", "snr_at_highest_b"]


def _level_signals(
    data: NDArray[np.floating], bvals: ArrayLike, voxels: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(levels, (n_voxels, n_levels) signals): repeats of one b averaged, as the fit does."""
    levels, labels = bvalue_levels(bvals)
    signal = np.asarray(data, dtype=np.float64)[voxels]
    averaged = np.stack([signal[:, labels == i].mean(axis=1) for i in range(levels.size)], axis=1)
    return levels, averaged


def snr_at_highest_b(
    data: NDArray[np.floating],
    bvals: ArrayLike,
    roi: NDArray[np.bool_],
    sigma: float | None,
) -> tuple[float, float | None]:
    """(highest b, mean ROI signal there / σ); the SNR is None without σ or ROI voxels."""
    levels, signals = _level_signals(data, bvals, roi)
    high_b = float(levels.max())
    if sigma is None or not sigma > 0 or signals.shape[0] == 0:
        return high_b, None
    return high_b, float(signals[:, -1].mean() / sigma)


def fit_residual(
    data: NDArray[np.floating],
    bvals: ArrayLike,
    fit: DkiFit,
    roi: NDArray[np.bool_],
    *,
    dki_bmin: float = 0.0,
) -> float | None:
    """Median over the fitted ROI voxels of RMS(signal − DKI curve) / S0; None if none fitted."""
    fitted = roi & ~fit.has_flag(FitFlag.BACKGROUND) & (fit.s0 > 0)
    if not fitted.any():
        return None
    levels, signals = _level_signals(data, bvals, fitted)
    keep = levels >= dki_bmin - 1e-9
    b = levels[keep][None, :]
    s0 = fit.s0[fitted][:, None]
    d = fit.dapp[fitted][:, None]
    k = fit.kapp[fitted][:, None]
    curve = s0 * np.exp(-b * d + (b * d) ** 2 * k / 6.0)
    rms = np.sqrt(np.mean((signals[:, keep] - curve) ** 2, axis=1)) / s0[:, 0]
    finite = rms[np.isfinite(rms)]
    return float(np.median(finite)) if finite.size else None
