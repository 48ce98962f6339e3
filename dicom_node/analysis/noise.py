"""Noise of magnitude DWI: σ from the air background (Rayleigh statistics) and the background mask.

Used by the DKI fit (:mod:`.dki`, the noise floor and the BACKGROUND flag) and the automatic ROI
(:mod:`.roi`, the breast outline); kept apart so neither has to import the other's fit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["background_mask", "estimate_sigma", "otsu_threshold"]

_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))  # median of a unit-σ Rayleigh variable


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
