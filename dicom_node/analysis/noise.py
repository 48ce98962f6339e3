"""Noise of magnitude DWI: σ from the air background (Rayleigh statistics) and the background mask.

Used by the DKI fit (:mod:`.dki`, the noise floor and the BACKGROUND flag) and the automatic ROI
(:mod:`.roi`, the breast outline); kept apart so neither has to import the other's fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage, optimize, special

__all__ = [
    "NoiseEstimate",
    "NoiseMethod",
    "background_mask",
    "chi_moment_ratio",
    "estimate_noise",
    "estimate_sigma",
    "estimate_sigma_repeats",
    "otsu_threshold",
]

_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))  # median of a unit-σ Rayleigh variable


def _air(
    data: ArrayLike, bvals: ArrayLike | None, *, min_voxels: int, max_samples: int, margin: int
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.bool_]] | None:
    """(data, lowest-b image, air mask): below Otsu's threshold and ``margin`` voxels from tissue."""
    arr = np.asarray(data)
    if arr.ndim < 2:
        raise ValueError("estimate_sigma needs an image with a b axis last")
    if arr.ndim >= 4 and arr.shape[-2] >= 128 and arr.shape[-3] >= 128:
        # Large in-plane matrices: every other row and column is plenty of background.
        arr = arr[..., ::2, ::2, :]
        margin = max(1, margin // 2)
    low = np.asarray(arr[..., _lowest_b(arr, bvals)], dtype=np.float64)
    pos = np.isfinite(low) & (low > 0)
    if int(pos.sum()) < min_voxels:
        return None
    vals = low[pos]
    threshold = otsu_threshold(vals[:: max(1, vals.size // max_samples)])
    bright = (low >= threshold).astype(np.float32)
    if low.ndim >= 2 and margin > 0:
        size = (1,) * (low.ndim - 2) + (2 * margin + 1,) * 2
        near = ndimage.uniform_filter(bright, size=size, mode="nearest") > 0
    else:
        near = bright > 0
    air = pos & ~near
    if int(air.sum()) < min_voxels:
        air = pos & (bright == 0)
    return arr, low, air


def estimate_sigma(
    data: ArrayLike,
    *,
    bvals: ArrayLike | None = None,
    min_voxels: int = 200,
    max_samples: int = 400_000,
    margin: int = 4,
) -> float | None:
    """Noise σ of magnitude images from their air background (Rayleigh statistics).

    Air is taken where the lowest-b image is below Otsu's threshold *and* no voxel above it lies
    within ``margin`` voxels in-plane, which keeps dark tissue next to the body (suppressed fat,
    partial volume) out of the sample. For Rayleigh noise the median is σ·√(2 ln 2), so
    σ = median / 1.1774, refined on values below 4σ and finally pooled over every b volume of
    the same voxels. Exact zeros (vendor background masking) carry no noise information and are
    ignored; a sample whose spread is not Rayleigh-like (coefficient of variation far from
    0.523) is rejected. Returns ``None`` when no usable background exists.
    """
    found = _air(data, bvals, min_voxels=min_voxels, max_samples=max_samples, margin=margin)
    if found is None:
        return None
    arr, low, air = found
    cand = low[air]
    cand = cand[:: max(1, cand.size // max_samples)]
    if cand.size < min_voxels:
        return None
    sigma = float(np.median(cand)) / _RAYLEIGH_MEDIAN
    core = cand
    for _ in range(3):
        core = cand[cand < 4.0 * sigma]
        if core.size < min_voxels or sigma <= 0:
            return None
        sigma = float(np.median(core)) / _RAYLEIGH_MEDIAN
    cv = float(np.std(core) / np.mean(core))
    if not 0.35 < cv < 0.70:  # Rayleigh: sqrt(4/π − 1) = 0.523
        return None
    air &= low < 4.0 * sigma
    pooled = arr[air].astype(np.float64).ravel()
    pooled = pooled[(pooled > 0) & (pooled < 4.0 * sigma)]
    pooled = pooled[:: max(1, pooled.size // max_samples)]
    if pooled.size >= min_voxels:
        sigma = float(np.median(pooled)) / _RAYLEIGH_MEDIAN
    return sigma if sigma > 0 else None


class NoiseMethod(StrEnum):
    """Where σ came from (recorded in ``provenance.noise.method``)."""

    GIVEN = "given"  # set by the operator (AnalysisSettings.sigma)
    BACKGROUND = "background"  # air background, Rayleigh (N = 1) median estimator
    BACKGROUND_CHI = "background_chi"  # air background, central-χ moments with N > 1 coils
    REPEATS = "repeats"  # differences of repeated acquisitions in bright tissue


@dataclass(frozen=True)
class NoiseEstimate:
    """σ (per-channel Gaussian std, signal units), its source and the effective coil count N.

    ``effective_coils`` is 1 for Rician data (single coil, SENSE or adaptive combine). For
    sum-of-squares combined parallel imaging the background is central χ with 2N degrees of
    freedom (Constantinides 1997; Aja-Fernández 2009); N is estimated from the moment ratio
    E[m]²/E[m²] (π/4 for N = 1). ``moment_ratio`` is that measured ratio (the Rician check).
    """

    sigma: float
    method: NoiseMethod
    effective_coils: float = 1.0
    moment_ratio: float | None = None
    n_samples: int = 0

    @property
    def rician(self) -> bool:
        """N = 1: the Rician model of ``nls_rician`` is the right one."""
        return self.effective_coils == 1.0


def chi_moment_ratio(n: float) -> float:
    """E[m]² / E[m²] of a central χ variable with 2n degrees of freedom (π/4 at n = 1)."""
    return float(np.exp(2.0 * (special.gammaln(n + 0.5) - special.gammaln(n))) / n)


def estimate_noise(
    data: ArrayLike,
    *,
    bvals: ArrayLike | None = None,
    min_voxels: int = 200,
    max_samples: int = 400_000,
    margin: int = 4,
    rician_tolerance: float = 0.25,
) -> NoiseEstimate | None:
    """σ and the effective coil count N from the air background, or from repeats without air.

    The air voxels are chosen as in :func:`estimate_sigma`. Their moment ratio E[m]²/E[m²] gives
    N (solving :func:`chi_moment_ratio`); when N is within ``rician_tolerance`` of 1 the data are
    taken as Rician (N = 1, documented assumption with this check) and σ is the robust Rayleigh
    median estimate of :func:`estimate_sigma`; otherwise σ = √(E[m²] / 2N). Without usable air,
    repeated acquisitions of one b-value are tried (:func:`estimate_sigma_repeats`); so they are
    when the "air" sample is not noise-like (moment ratio below Rayleigh's: N < 1).
    """
    arr = np.asarray(data)
    found = _air(arr, bvals, min_voxels=min_voxels, max_samples=max_samples, margin=margin)
    if found is not None:
        sub, _low, air = found
        sample = sub[air].astype(np.float64).ravel()
        sample = sample[np.isfinite(sample) & (sample > 0)]
        if sample.size >= min_voxels:
            # Trim the far tail (tissue partial volume, ghosts) without biasing pure noise:
            # the 99.9th percentile of χ noise is within 3.3 median for every N.
            sample = sample[sample < 3.3 * np.median(sample)]
            sample = sample[:: max(1, sample.size // max_samples)]
            m1, m2 = float(np.mean(sample)), float(np.mean(sample**2))
            ratio = m1 * m1 / m2 if m2 > 0 else float("nan")
            n_coils = _coils_from_ratio(ratio)
            # N below 1 is not noise at all (dark tissue taken for air): try the repeats.
            if n_coils is not None and n_coils >= 1.0 - rician_tolerance:
                if n_coils <= 1.0 + rician_tolerance:
                    sigma = estimate_sigma(
                        arr, bvals=bvals, min_voxels=min_voxels, max_samples=max_samples,
                        margin=margin,
                    )  # fmt: skip
                    if sigma is not None:
                        return NoiseEstimate(
                            sigma, NoiseMethod.BACKGROUND, 1.0, ratio, int(sample.size)
                        )
                else:
                    sigma = math.sqrt(m2 / (2.0 * n_coils))
                    return NoiseEstimate(
                        sigma, NoiseMethod.BACKGROUND_CHI, round(n_coils, 2), ratio, sample.size
                    )
    if bvals is not None:
        sigma = estimate_sigma_repeats(arr, bvals)
        if sigma is not None:
            return NoiseEstimate(sigma, NoiseMethod.REPEATS, 1.0, None, 0)
    return None


def _coils_from_ratio(ratio: float) -> float | None:
    """N with :func:`chi_moment_ratio` (N) = ``ratio``; None outside N in [0.5, 64]."""
    if not math.isfinite(ratio):
        return None
    lo, hi = 0.5, 64.0
    f_lo, f_hi = chi_moment_ratio(lo) - ratio, chi_moment_ratio(hi) - ratio
    if f_lo > 0 or f_hi < 0:  # ratio increases with N
        return None
    return float(optimize.brentq(lambda n: chi_moment_ratio(n) - ratio, lo, hi, xtol=1e-4))


def estimate_sigma_repeats(
    data: ArrayLike, bvals: ArrayLike, *, min_voxels: int = 200, snr_min: float = 8.0
) -> float | None:
    """σ from repeated acquisitions of one b-value (b = 0 repeats or several directions).

    In bright voxels (mean above ``snr_min``·σ, iterated) Rician noise is nearly Gaussian with
    std σ, so the differences of two repeats have std σ√2. Pooled over every pair of repeats
    and made robust with the median absolute deviation. Directions of one b-value differ in
    true signal where diffusion is anisotropic; the lowest b with repeats is preferred for that
    reason. None without repeats or bright voxels.
    """
    arr = np.asarray(data, dtype=np.float64)
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if b.size != arr.shape[-1]:
        raise ValueError(f"{b.size} b-values for {arr.shape[-1]} entries on the last axis")
    flat = arr.reshape(-1, b.size)
    for level in np.unique(np.round(b, -1)):
        idx = np.flatnonzero(np.abs(b - level) <= max(5.0, 0.01 * level))
        if idx.size < 2:
            continue
        reps = flat[:, idx]
        mean = reps.mean(axis=1)
        diffs = (reps[:, 1:] - reps[:, :1]) / math.sqrt(2.0)
        sigma = float(np.median(np.abs(diffs))) / 0.6745
        for _ in range(3):
            bright = mean > snr_min * sigma
            if int(bright.sum()) < min_voxels:
                break
            sigma = float(np.median(np.abs(diffs[bright]))) / 0.6745
        else:
            return sigma if sigma > 0 else None
    return None


def background_mask(
    data: ArrayLike,
    sigma: float | None,
    *,
    bvals: ArrayLike | None = None,
    snr_threshold: float = 5.0,
) -> NDArray[np.bool_]:
    """Voxels whose lowest-b signal is below ``snr_threshold``·σ (noise-based S0 threshold).

    The 99.99th percentile of pure Rayleigh noise is 4.3σ, so 5σ keeps essentially no noise-only
    voxel while any tissue with S0-SNR above 5 is fitted. Without σ only non-positive signal
    counts as background.
    """
    arr = np.asarray(data)
    low = np.asarray(arr[..., _lowest_b(arr, bvals)], dtype=np.float64)
    if sigma is None:
        return ~(low > 0)
    return ~(low >= snr_threshold * sigma)


def _lowest_b(arr: NDArray[Any], bvals: ArrayLike | None) -> int:
    """Index of the lowest-b acquisition on the last axis (the first one if ``bvals`` is None)."""
    if bvals is None:
        return 0
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if b.size != arr.shape[-1]:
        raise ValueError(f"{b.size} b-values for {arr.shape[-1]} entries on the last axis")
    return int(np.argmin(b))


def otsu_threshold(values: NDArray[np.float64], nbins: int = 256) -> float:
    """Otsu's threshold (IEEE Trans SMC 1979) of a 1-D sample."""
    hist, edges = np.histogram(values, bins=nbins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])
