"""Diffusion kurtosis imaging (DKI) of trace-weighted breast DWI: a model/fit API in DIPY's style.

The signal model is Jensen's cumulant expansion for one (trace) direction (Jensen et al., Magn
Reson Med 2005;53:1432):

    S(b) = S0 · exp(−b·Dapp + b²·Dapp²·Kapp / 6)

which is only physical while the curve falls, b < 3 / (Dapp·Kapp). Three fit methods are offered:

- ``wls``: log-linear weighted least squares with weights n·S² — numerically the same estimator as
  DIPY's mean-signal DKI (``dipy.reconst.msdki``, Henriques et al., NeuroImage 2018), solved for
  all voxels at once.
- ``nls`` (default): bounded Levenberg–Marquardt on the magnitudes, started from ``wls``
  reweighted once with its predicted signal.
- ``nls_rician``: the same, but fitting the Rician expectation E[|S|] (Gudbjartsson & Patz, Magn
  Reson Med 1995) so the noise floor at high b no longer inflates Kapp.

All voxels of a block are solved together (no Python loop per voxel): the WLS normal equations
are BLAS products over the b axis; each Levenberg–Marquardt iteration needs two BLAS products of
b-moments, one ``exp`` and closed-form (adjugate) 3×3 solves, run in float32. Converged voxels
leave the working arrays; the slow tail of every block is pooled into one second pass. Blocks
bound the memory on a whole breast volume and may be spread over threads (``n_threads``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = [
    "B0_THRESHOLD",
    "DEFAULT_BOUNDS",
    "Bounds",
    "DkiFit",
    "DkiMethod",
    "DkiModel",
    "DkiSettings",
    "FitFlag",
    "background_mask",
    "estimate_sigma",
    "fit",
    "group_bvals",
    "otsu_threshold",
]

#: b-values below this (s/mm²) are treated as b≈0 (Philips stores 0.001…0.004 for "b=0" repeats).
B0_THRESHOLD = 5.0
#: Relative tolerance for treating two b-values as one level (UIH 929.75 vs 928.29).
B_REL_TOL = 0.01
_B_SCALE = 1000.0  # internal b unit: ms/µm² (b/1000), so Dapp is in µm²/ms = 10⁻³ mm²/s
_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))  # median of a unit-σ Rayleigh variable


class DkiMethod(StrEnum):
    """Fit methods (coerced once from a string; unknown names raise ``ValueError``)."""

    WLS = "wls"
    NLS = "nls"
    NLS_RICIAN = "nls_rician"


class FitFlag(IntFlag):
    """Per-voxel quality flags of a DKI fit (bit field; a voxel may carry several).

    Flagged voxels are kept, not dropped (see docs: dki-and-features notes), so the histogram
    features stay comparable; the counts travel in the result's QC block.
    """

    NONE = 0
    #: Dapp or Kapp sits on (or, for the unconstrained ``wls``, beyond) a bound of the box.
    AT_BOUND = 1
    #: Dapp·Kapp·b_max ≥ 3: the fitted curve turns upwards inside the sampled b range.
    DK_BMAX = 2
    #: Signal at b_max is below ``low_signal_snr``·σ: the high-b points are mostly noise floor.
    LOW_SIGNAL = 4
    #: Voxel is background (lowest-b signal below the noise threshold) and was not fitted.
    BACKGROUND = 8


@dataclass(frozen=True)
class Bounds:
    """Box constraints of the fit: Dapp in mm²/s (lower bound is open), Kapp unitless."""

    dapp: tuple[float, float] = (0.0, 3.5e-3)
    kapp: tuple[float, float] = (0.0, 3.0)

    def __post_init__(self) -> None:
        dlo, dhi = self.dapp
        klo, khi = self.kapp
        if not (0.0 <= dlo < dhi) or not (klo < khi):
            raise ValueError(f"invalid bounds: dapp={self.dapp}, kapp={self.kapp}")

    def to_dict(self) -> dict[str, list[float]]:
        return {"dapp": [float(v) for v in self.dapp], "kapp": [float(v) for v in self.kapp]}


DEFAULT_BOUNDS = Bounds()


@dataclass(frozen=True)
class DkiSettings:
    """Everything that changes the numbers: recorded with every result (dki-and-features notes)."""

    method: DkiMethod
    bvals: tuple[float, ...]  # b-values (s/mm²) that entered the fit, one per level
    dki_bmin: float
    bounds: Bounds
    sigma: float | None  # noise σ used (given or estimated), signal units

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "b_values": list(self.bvals),
            "dki_bmin": self.dki_bmin,
            "bounds": self.bounds.to_dict(),
            "sigma": self.sigma,
        }


def group_bvals(
    bvals: ArrayLike, *, b0_threshold: float = B0_THRESHOLD, rel_tol: float = B_REL_TOL
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Group nearly equal b-values into levels.

    Returns ``(levels, labels)``: the mean exact b of each level (ascending; b < ``b0_threshold``
    counts as 0) and, per input b, the index of its level. Exact values are kept for the fit.
    """
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if b.size == 0 or not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError(f"b-values must be finite and ≥ 0, got {b.tolist()}")
    eff = np.where(b < b0_threshold, 0.0, b)
    order = np.argsort(eff, kind="stable")
    labels = np.empty(b.size, dtype=np.intp)
    level = 0
    start = eff[order[0]]
    for n, i in enumerate(order):  # loop over acquisitions (a handful), not voxels
        if n and eff[i] - start > max(rel_tol * start, 1e-9):
            level += 1
            start = eff[i]
        labels[i] = level
    levels = np.array([eff[labels == g].mean() for g in range(level + 1)])
    return levels, labels


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


# ---------------------------------------------------------------------------------------------
# Vectorised linear algebra on per-voxel 3×3 systems (arrays of shape (N,))
# ---------------------------------------------------------------------------------------------


def _solve3(
    a00: NDArray[Any],
    a01: NDArray[Any],
    a02: NDArray[Any],
    a11: NDArray[Any],
    a12: NDArray[Any],
    a22: NDArray[Any],
    r0: NDArray[Any],
    r1: NDArray[Any],
    r2: NDArray[Any],
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Solve symmetric 3×3 systems for every voxel at once by the adjugate (Cramer's rule)."""
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
    x0 = (c00 * r0 + c01 * r1 + c02 * r2) * inv
    x1 = (c01 * r0 + c11 * r1 + c12 * r2) * inv
    x2 = (c02 * r0 + c12 * r1 + c22 * r2) * inv
    return x0, x1, x2


def _wls_block(
    y: NDArray[np.float64],
    b: NDArray[np.float64],
    n: NDArray[np.float64],
    weight_signal: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    """Log-linear WLS (weights n·S², as DIPY msdki) for a ``(n_b, N)`` block of positive signal.

    Returns ``(3, N)``: S0, D (internal units), K. The signal is expected pre-scaled to O(1).
    ``weight_signal`` replaces the measured S in the weights (iteratively reweighted least
    squares with the predicted signal, Veraart et al., NeuroImage 2013;81:335).
    """
    logy = np.log(y)
    ws = y if weight_signal is None else weight_signal
    w = n[:, None] * ws * ws
    x0, x1 = -b, b * b / 6.0
    wl = w * logy
    a00 = (x0 * x0) @ w
    a01 = (x0 * x1) @ w
    a02 = x0 @ w
    a11 = (x1 * x1) @ w
    a12 = x1 @ w
    ones = np.ones_like(b)
    a22 = ones @ w
    r0 = x0 @ wl
    r1 = x1 @ wl
    r2 = ones @ wl
    d, dk, lns0 = _solve3(a00, a01, a02, a11, a12, a22, r0, r1, r2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = dk / (d * d)
        s0 = np.exp(lns0)
    return np.stack([s0, d, k])


# Polynomial approximations of the Bessel functions I0 and I1 (Abramowitz & Stegun 9.8.1–9.8.4,
# |relative error| < 2.2e-7): scipy's i0e/i1e evaluate in double precision at ~25 ns an element
# and were 80 % of the Rician fit; these are plain array arithmetic in the working precision.
_I0_SMALL = (1.0, 3.5156229, 3.0899424, 1.2067492, 0.2659732, 0.0360768, 0.0045813)
_I1_SMALL = (0.5, 0.87890594, 0.51498869, 0.15084934, 0.02658733, 0.00301532, 0.00032411)
_I0_LARGE = (
    0.39894228, 0.01328592, 0.00225319, -0.00157565, 0.00916281,
    -0.02057706, 0.02635537, -0.01647633, 0.00392377,
)  # fmt: skip
_I1_LARGE = (
    0.39894228, -0.03988024, -0.00362018, 0.00163801, -0.01031555,
    0.02282967, -0.02895312, 0.01787654, -0.00420059,
)  # fmt: skip


def _horner(coefs: tuple[float, ...], x: NDArray[Any]) -> NDArray[Any]:
    out = np.full_like(x, coefs[-1])
    for c in coefs[-2::-1]:  # a handful of coefficients, not voxels
        out = out * x + c
    return out


def _bessel_i0e_i1e(z: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Exponentially scaled modified Bessel functions e^−z·I0(z), e^−z·I1(z) for z ≥ 0."""
    zs = np.minimum(z, 3.75)  # each branch sees only its own range: no overflow
    t2 = (zs / 3.75) ** 2
    ez = np.exp(-zs)
    i0_small = _horner(_I0_SMALL, t2) * ez
    i1_small = _horner(_I1_SMALL, t2) * zs * ez
    zl = np.maximum(z, 3.75)
    u = 3.75 / zl
    rs = 1.0 / np.sqrt(zl)
    i0_large = _horner(_I0_LARGE, u) * rs
    i1_large = _horner(_I1_LARGE, u) * rs
    small = z < 3.75
    return np.where(small, i0_small, i0_large), np.where(small, i1_small, i1_large)


def _rician_mean(
    a: NDArray[np.float64], sigma: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """E[|S|] of a Rician variable with amplitude ``a`` and noise ``sigma``, and dE/da.

    E = σ√(π/2)·[(1+2z)·I0e(z) + 2z·I1e(z)] with z = a²/(4σ²) (Laguerre L½ written with
    exponentially scaled Bessel functions, which stay finite at any SNR); dE/da = √(π/2)·
    a/(2σ)·[I0e(z) + I1e(z)].
    """
    z = a * a / (4.0 * sigma * sigma)
    i0, i1 = _bessel_i0e_i1e(z)
    e = sigma * _SQRT_HALF_PI * ((1.0 + 2.0 * z) * i0 + 2.0 * z * i1)
    de = _SQRT_HALF_PI * a / (2.0 * sigma) * (i0 + i1)
    return e, de


def _evaluate(
    design: NDArray[Any],
    y: NDArray[Any],
    n: NDArray[Any],
    sigma: NDArray[Any] | None,
    theta: NDArray[Any],
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any] | None]:
    """Attenuation E, residual, weighted cost and (Rician only) dE[|S|]/dS for a block.

    The exponent −b·D + b²·D²K/6 of every voxel and b is one BLAS product of the ``(n_b, 2)``
    design ``[−b, b²/6]`` with the ``(2, M)`` coefficients ``[D, D²K]``.
    """
    d = theta[1]
    e = np.exp(design @ np.stack([d, d * d * theta[2]]))
    s = e * theta[0]
    dmean = None
    if sigma is not None:
        mean, dmean = _rician_mean(s, sigma)
        r = mean - y
    else:
        r = s - y
    return e, r, n @ (r * r), dmean


def _lm(
    y: NDArray[Any],
    b: NDArray[Any],
    n: NDArray[Any],
    lo: NDArray[Any],
    hi: NDArray[Any],
    theta: NDArray[Any],
    sigma: NDArray[Any] | None,
    *,
    max_iter: int,
    tol: float,
    compact_at: float = 0.8,
) -> tuple[NDArray[Any], NDArray[np.intp]]:
    """Projected Levenberg–Marquardt (Marquardt's diagonal scaling) for all voxels of a block.

    ``y`` is ``(n_b, M)``, ``theta`` ``(3, M)`` = (S0, D, K) in internal units. The Jacobian
    columns are E, S0·E·(b²·DK/3 − b) and S0·E·b²·D²/6, so every entry of JᵀJ and Jᵀr is a
    polynomial in per-voxel scalars times a b-moment Σ n·bᵖ·E² (p ≤ 4) or Σ n·bᵖ·E·r (p ≤ 2):
    two BLAS products per iteration instead of nine weighted sums. Parameters on a bound whose
    descent points out of the box are frozen for the step (an active set), trial points are
    projected onto the box and kept only if they lower the cost. A voxel has converged when a
    step changes its cost by ≤ tol (relative) or the predicted decrease is ≤ 10·tol; converged
    voxels are dropped from the working arrays once ``compact_at`` of them have finished (the
    gather costs more than letting a few idle along). Returns parameters and iterations.
    """
    lo_c, hi_c = lo[:, None], hi[:, None]
    out = np.clip(theta, lo_c, hi_c)
    iters = np.full(out.shape[1], max_iter, dtype=np.intp)
    ids = np.arange(out.shape[1])
    th = out.copy()
    design = np.stack([-b, b * b / 6.0], axis=1)
    moments = np.stack([n * b**p for p in range(5)])  # (5, n_b)
    yw, sw = y, sigma
    e, r, cost, dmean = _evaluate(design, yw, n, sw, th)
    lam = np.full(th.shape[1], 1e-3, dtype=th.dtype)
    fin = np.zeros(th.shape[1], dtype=bool)  # converged, still in the working arrays
    conv = np.full(th.shape[1], max_iter, dtype=np.intp)  # iteration of convergence
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    eps_lo, eps_hi = (lo + 1e-9 * span)[:, None], (hi - 1e-9 * span)[:, None]
    one = th.dtype.type(1.0)
    zero = th.dtype.type(0.0)
    for it in range(max_iter):
        s0, d, k = th[0], th[1], th[2]
        et = e if dmean is None else e * dmean
        m = moments @ (et * et)
        rho = moments[:3] @ (et * r)
        c1 = d * k / 3.0
        c2 = d * d / 6.0
        s02 = s0 * s0
        t1 = c1 * m[4] - m[3]
        a00 = m[0]
        a01 = s0 * (c1 * m[2] - m[1])
        a02 = s0 * c2 * m[2]
        a11 = s02 * (c1 * t1 - c1 * m[3] + m[2])
        a12 = s02 * c2 * t1
        a22 = s02 * c2 * c2 * m[4]
        g = np.stack([rho[0], s0 * (c1 * rho[2] - rho[1]), s0 * c2 * rho[2]])
        # Active set: freeze parameters pinned at a bound whose descent points out of the box
        # (their row and column of the damped normal matrix become the identity, their
        # gradient 0), written with 0/1 multipliers so no voxel is singled out.
        pinned = ((th <= eps_lo) & (g > 0)) | ((th >= eps_hi) & (g < 0))
        f = np.logical_not(pinned).astype(th.dtype)
        f0, f1, f2 = f[0], f[1], f[2]
        damp = one + lam
        dx = np.stack(
            _solve3(
                (a00 * damp - one) * f0 + one, a01 * (f0 * f1), a02 * (f0 * f2),
                (a11 * damp - one) * f1 + one, a12 * (f1 * f2), (a22 * damp - one) * f2 + one,
                -g[0] * f0, -g[1] * f1, -g[2] * f2,
            )
        )  # fmt: skip
        # Gauss–Newton predicted decrease −g·dx: when it is below 10·tol·cost the voxel converges
        # with this step, saving the confirming iteration (measured: Kapp moves < 0.005 at the
        # 99th percentile, ~2 % of its noise at SNR 30).
        tiny = np.abs(np.einsum("ij,ij->j", g, dx)) <= (10.0 * tol) * cost
        trial = th + dx
        trial[~np.isfinite(trial)] = zero
        np.clip(trial, lo_c, hi_c, out=trial)
        e_t, r_t, cost_t, dmean_t = _evaluate(design, yw, n, sw, trial)
        better = cost_t < cost
        # Converged when the step changes the cost by less than tol (relative) either way.
        flat = np.abs(cost - cost_t) <= tol * cost
        # Most steps are accepted: adopt the trial arrays and patch back the rejected columns.
        # A rejected step that changes the cost by less than tol is as good as the current
        # point (it only happens at convergence), so those voxels are not patched.
        rej = np.flatnonzero(~(better | flat | fin))
        if rej.size:
            trial[:, rej], e_t[:, rej], r_t[:, rej] = th[:, rej], e[:, rej], r[:, rej]
            if dmean is not None and dmean_t is not None:
                dmean_t[:, rej] = dmean[:, rej]
        th, e, r, dmean = trial, e_t, r_t, dmean_t
        cost = np.where(better, cost_t, cost)
        lam = np.where(better, np.maximum(lam * 0.1, 1e-9), lam * 10.0)
        new = (flat | (better & tiny) | (lam > 1e7)) & ~fin
        if new.any():
            conv[new] = it + 1
            fin |= new
            # Compact only when it pays: converged voxels idle along cheaply until then.
            if fin.all():
                break
            if fin.mean() >= compact_at:
                done_ids = ids[fin]
                out[:, done_ids] = np.compress(fin, th, axis=1)
                iters[done_ids] = conv[fin]
                keep = ~fin  # np.compress gathers columns ~3x faster than boolean indexing
                ids, cost, lam, conv = ids[keep], cost[keep], lam[keep], conv[keep]
                fin = fin[keep]
                th, e, r, yw = (np.compress(keep, a, axis=1) for a in (th, e, r, yw))
                if dmean is not None and sw is not None:
                    dmean, sw = np.compress(keep, dmean, axis=1), sw[keep]
    out[:, ids] = th
    iters[ids] = conv
    return out, iters


def _single_threaded_blas() -> AbstractContextManager[object]:
    """Limit BLAS to one thread (threadpoolctl, shipped with scikit-learn); no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------------------
# Model and fit
# ---------------------------------------------------------------------------------------------


class DkiFit:
    """Result of :meth:`DkiModel.fit`: one ``(..., 3)`` array of (S0, Dapp [mm²/s], Kapp).

    Voxels outside the fit mask hold zeros (as in DIPY); background voxels inside it hold zeros
    and carry :attr:`FitFlag.BACKGROUND`.
    """

    def __init__(
        self,
        model: DkiModel,
        params: NDArray[np.float64],
        flags: NDArray[np.uint8],
        settings: DkiSettings,
        iterations: NDArray[np.integer[Any]] | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self._flags = flags
        self.settings = settings
        self.iterations = iterations

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.params.shape[:-1])

    @cached_property
    def s0(self) -> NDArray[np.float64]:
        """Fitted signal at b = 0 (signal units)."""
        return self.params[..., 0]

    @cached_property
    def dapp(self) -> NDArray[np.float64]:
        """Apparent diffusion coefficient of the kurtosis model, mm²/s."""
        return self.params[..., 1]

    @cached_property
    def kapp(self) -> NDArray[np.float64]:
        """Apparent kurtosis (unitless)."""
        return self.params[..., 2]

    @cached_property
    def flags(self) -> NDArray[np.uint8]:
        """Bit field of :class:`FitFlag` per voxel."""
        return self._flags

    def has_flag(self, flag: FitFlag) -> NDArray[np.bool_]:
        """Boolean map of voxels carrying ``flag``."""
        return (self._flags & np.uint8(flag)) != 0

    def flag_counts(self, mask: NDArray[np.bool_] | None = None) -> dict[str, int]:
        """Number of voxels per flag (inside ``mask`` if given), keyed by lower-case flag name."""
        out: dict[str, int] = {}
        for flag in (FitFlag.AT_BOUND, FitFlag.DK_BMAX, FitFlag.LOW_SIGNAL, FitFlag.BACKGROUND):
            hit = self.has_flag(flag)
            if mask is not None:
                hit = hit & mask
            out[str(flag.name).lower()] = int(hit.sum())
        return out

    def __getitem__(self, index: Any) -> DkiFit:
        flags = np.asarray(self._flags[index])
        params = np.asarray(self.params[index])
        if params.shape != (*flags.shape, 3):
            raise IndexError("index the voxel axes only, not the parameter axis")
        iters = None if self.iterations is None else np.asarray(self.iterations[index])
        return DkiFit(self.model, params, flags, self.settings, iters)

    def __repr__(self) -> str:
        return f"DkiFit(shape={self.shape}, method={self.settings.method.value!r})"


class DkiModel:
    """Trace-weighted DKI model: checks the acquisition and builds the design once.

    Parameters
    ----------
    bvals
        b-values in s/mm², one per entry of the data's last axis (repeats allowed).
    method
        ``"wls"``, ``"nls"`` (default) or ``"nls_rician"`` (:class:`DkiMethod`).
    dki_bmin
        Acquisitions with b below this (s/mm²) are left out of the DKI fit (IVIM exclusion);
        0 keeps all. S0 is then extrapolated. Recorded in the settings.
    bounds
        :class:`Bounds` for Dapp (mm²/s) and Kapp.
    sigma
        Noise σ in signal units; estimated from the background at fit time when ``None``.
    chunk_size, n_threads, max_iter, tol
        Voxels solved per block, worker threads (default 1: on the shared 2-core host a second
        thread measured no gain), LM iteration cap and relative convergence tolerance.
    background_snr, low_signal_snr
        Multiples of σ for the background mask (lowest-b signal) and the LOW_SIGNAL flag (b_max).
    working_dtype
        Precision of the Levenberg–Marquardt iterations. float32 (default) halves memory traffic
        and doubles the SIMD width of ``exp``; its rounding (1e-7) is far below the noise-level
        parameter error. The ``wls`` method (held to DIPY at 1e-9) and all outputs use float64.
    first_pass_iter
        Iterations every block gets before its unconverged voxels are pooled across blocks.
    """

    def __init__(
        self,
        bvals: ArrayLike,
        *,
        method: DkiMethod | str = DkiMethod.NLS,
        dki_bmin: float = 0.0,
        bounds: Bounds = DEFAULT_BOUNDS,
        sigma: float | None = None,
        chunk_size: int = 32768,
        n_threads: int | None = None,
        max_iter: int = 30,
        tol: float = 1e-5,
        background_snr: float = 5.0,
        low_signal_snr: float = 3.0,
        working_dtype: type[np.floating[Any]] = np.float32,
        first_pass_iter: int = 6,
    ) -> None:
        self.method = DkiMethod(method)
        b = np.asarray(bvals, dtype=np.float64).ravel()
        levels, labels = group_bvals(b)
        if dki_bmin < 0 or not math.isfinite(dki_bmin):
            raise ValueError(f"dki_bmin must be finite and ≥ 0, got {dki_bmin}")
        keep_level = levels >= dki_bmin - 1e-9
        if keep_level.sum() < 3:
            raise ValueError(
                "DKI needs at least 3 distinct b-values (b < 5 s/mm² counts as 0) at or above "
                f"dki_bmin={dki_bmin:g}; got levels {[round(float(v), 3) for v in levels]} "
                f"from b-values {b.tolist()}"
            )
        if levels[keep_level].max() <= 0:
            raise ValueError("DKI needs diffusion weighting: all b-values are ≈ 0")
        if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be positive, got {sigma}")
        if chunk_size < 1 or not 1 <= max_iter <= 1000:
            raise ValueError("chunk_size must be ≥ 1 and max_iter in 1..1000")
        self.bvals = b
        self.dki_bmin = float(dki_bmin)
        self.bounds = bounds
        self.sigma = sigma
        self.chunk_size = int(chunk_size)
        self.n_threads = n_threads
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.background_snr = float(background_snr)
        self.low_signal_snr = float(low_signal_snr)
        self.working_dtype = working_dtype
        self.first_pass_iter = int(first_pass_iter)
        # Data-independent pieces, built once.
        self.levels = levels[keep_level]
        level_index = np.flatnonzero(keep_level)
        #: (n_levels, n_acquisitions) averaging matrix: a level is the mean of its repeats.
        avg = (labels[None, :] == level_index[:, None]).astype(np.float64)
        self.counts = avg.sum(axis=1)
        self._average = avg / self.counts[:, None]
        self._identity = avg.shape[0] == avg.shape[1] and bool(np.all(avg == np.eye(avg.shape[0])))
        self._b = self.levels / _B_SCALE
        self.b_max = float(self.levels.max())
        self._lowest = int(np.argmin(b))  # acquisition used for the background test
        self._highest_level = int(np.argmax(self.levels))
        #: Design matrix of the log-linear problem (columns −b, b²/6, 1; b in ms/µm²).
        self.design_matrix = np.stack([-self._b, self._b**2 / 6.0, np.ones_like(self._b)], 1)

    def settings(self, sigma: float | None = None) -> DkiSettings:
        return DkiSettings(
            method=self.method,
            bvals=tuple(float(v) for v in self.levels),
            dki_bmin=self.dki_bmin,
            bounds=self.bounds,
            sigma=self.sigma if sigma is None else sigma,
        )

    def fit(self, data: ArrayLike, *, mask: ArrayLike | None = None) -> DkiFit:
        """Fit every masked voxel of ``data`` (b axis last) in vectorised 2-D blocks.

        Iterations run in two passes: every block gets ``first_pass_iter`` Levenberg–Marquardt
        steps; the few voxels not yet converged are then pooled across blocks and finished
        together, so the slow tail costs one set of iterations rather than one per block.
        """
        arr = np.asarray(data)
        if arr.shape[-1] != self.bvals.size:
            raise ValueError(
                f"data has {arr.shape[-1]} b entries on its last axis, model has {self.bvals.size}"
            )
        vshape = arr.shape[:-1]
        if mask is None:
            m = np.ones(vshape, dtype=bool)
        else:
            m = np.asarray(mask, dtype=bool)
            if m.shape != vshape:
                raise ValueError(f"mask shape {m.shape} does not match data shape {vshape}")
        sigma = self.sigma
        if sigma is None:
            sigma = estimate_sigma(arr, bvals=self.bvals) if arr.ndim >= 2 else None
        if self.method is DkiMethod.NLS_RICIAN and sigma is None:
            raise ValueError(
                "nls_rician needs the noise sigma: pass sigma= or give data with background"
            )
        bg = background_mask(arr, sigma, bvals=self.bvals, snr_threshold=self.background_snr) & m
        flat_idx = np.flatnonzero(m & ~bg)
        params = np.zeros((*vshape, 3), dtype=np.float64)
        flags = np.zeros(vshape, dtype=np.uint8)
        iters = np.zeros(vshape, dtype=np.int16)  # LM iterations per voxel (diagnostic)
        flags[bg] = FitFlag.BACKGROUND
        flat = arr.reshape(-1, arr.shape[-1])
        p_flat, f_flat, i_flat = params.reshape(-1, 3), flags.reshape(-1), iters.reshape(-1)
        first = min(self.max_iter, self.first_pass_iter)
        leftovers: list[NDArray[np.intp]] = []

        # WLS must match DIPY to 1e-9: float64. The iterative fits run in ``working_dtype``.
        dt = np.float64 if self.method is DkiMethod.WLS else self.working_dtype

        def gather(sel: NDArray[np.intp]) -> NDArray[Any]:
            block = np.ascontiguousarray(np.take(flat, sel, axis=0).T, dtype=dt)  # (n_b, M)
            return block if self._identity else (self._average.astype(dt) @ block)

        def first_pass(start: int) -> None:
            sel = flat_idx[start : start + self.chunk_size]
            p, it, fl = self._fit_block(gather(sel), sigma, max_iter=first)
            p_flat[sel], i_flat[sel], f_flat[sel] = p.T, it, fl
            pending = it >= first
            if self.method is not DkiMethod.WLS and pending.any():
                leftovers.append(sel[pending])

        def second_pass(start: int) -> None:
            sel = rest[start : start + self.chunk_size]
            p, it, fl = self._fit_block(
                gather(sel), sigma, theta0=p_flat[sel].T, max_iter=self.max_iter - first
            )
            p_flat[sel], f_flat[sel] = p.T, fl
            i_flat[sel] += it

        # The per-block BLAS products are small: a multi-threaded BLAS only adds hand-offs
        # (and stalls badly on a shared host), so keep it to one thread inside the fit.
        with _single_threaded_blas():
            self._run(first_pass, range(0, flat_idx.size, self.chunk_size))
            if leftovers and self.max_iter > first:
                rest = np.concatenate(leftovers)
                self._run(second_pass, range(0, rest.size, self.chunk_size))
        return DkiFit(self, params, flags, self.settings(sigma), iters)

    def _run(self, work: Callable[[int], None], starts: Sequence[int] | range) -> None:
        n = self.n_threads or 1
        if n <= 1 or len(starts) <= 1:
            for s in starts:
                work(s)
            return
        with ThreadPoolExecutor(max_workers=n) as pool:
            for fut in [pool.submit(work, s) for s in starts]:
                fut.result()

    def _fit_block(
        self,
        y: NDArray[Any],
        sigma: float | None,
        *,
        max_iter: int,
        theta0: NDArray[np.float64] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.uint8]]:
        """Fit a ``(n_levels, M)`` block; returns params ``(3, M)`` (S0, mm²/s, 1), iterations
        and flags. ``theta0`` (same units as the output) restarts from an earlier pass."""
        dt = y.dtype.type
        scale = y.max(axis=0)
        scale = np.where(scale > 0, scale, dt(1.0))
        yn = np.maximum(y / scale, 1e-4 / scale)  # DIPY's MIN_POSITIVE_SIGNAL, in scaled units
        b, n = self._b.astype(dt), self.counts.astype(dt)
        dlo, dhi = self.bounds.dapp
        klo, khi = self.bounds.kapp
        lo = np.array([1e-9, max(dlo * _B_SCALE, 1e-6), klo], dtype=dt)
        hi = np.array([np.inf, dhi * _B_SCALE, khi], dtype=dt)
        sig_n = None if sigma is None else dt(sigma) / scale
        if theta0 is not None:
            theta = np.stack([theta0[0] / scale, theta0[1] * _B_SCALE, theta0[2]]).astype(dt)
        elif self.method is DkiMethod.NLS_RICIAN and sig_n is not None:
            # Start from the squared-signal bias correction: A² ≈ E[S²] − 2σ².
            ys = np.sqrt(np.maximum(yn * yn - 2.0 * sig_n * sig_n, (0.5 * sig_n) ** 2))
            theta = _wls_block(ys, b, n)
        else:
            theta = _wls_block(yn, b, n)
            if self.method is DkiMethod.NLS:
                # One reweighting with the predicted signal moves the start towards the
                # magnitude least-squares optimum (fewer Levenberg–Marquardt iterations).
                with np.errstate(over="ignore", invalid="ignore"):
                    bd = np.outer(b, theta[1])
                    pred = theta[0] * np.exp(bd * (bd * (theta[2] / 6.0) - 1.0))
                    ok = np.isfinite(pred) & (pred > 0)
                theta = _wls_block(yn, b, n, np.where(ok, pred, yn))
        iters = np.zeros(y.shape[1], dtype=np.intp)
        if self.method is DkiMethod.WLS:
            out = theta
        else:
            bad = ~np.all(np.isfinite(theta), axis=0)
            theta[:, bad] = np.array([[1.0], [1.0], [0.5]], dtype=dt)
            rice = sig_n if self.method is DkiMethod.NLS_RICIAN else None
            out, iters = _lm(yn, b, n, lo, hi, theta, rice, max_iter=max_iter, tol=self.tol)
        out = out.astype(np.float64)
        scale = scale.astype(np.float64)
        s0 = out[0] * scale
        d = out[1] / _B_SCALE
        k = out[2]
        span_d = dhi - dlo
        span_k = khi - klo
        with np.errstate(invalid="ignore"):
            # NaN compares False, so "inside" is False for a non-finite parameter as well.
            inside = (
                (d > dlo + 1e-6 * span_d)
                & (d < dhi - 1e-6 * span_d)
                & (k > klo + 1e-6 * span_k)
                & (k < khi - 1e-6 * span_k)
            )
            # Bit fields from boolean maps without masked assignments (bool views as 0/1).
            flags = (~inside).view(np.uint8) * np.uint8(FitFlag.AT_BOUND)
            flags |= (d * k * self.b_max >= 3.0).view(np.uint8) * np.uint8(FitFlag.DK_BMAX)
        if sigma is not None:
            low = y[self._highest_level] < self.low_signal_snr * sigma
            flags |= low.view(np.uint8) * np.uint8(FitFlag.LOW_SIGNAL)
        return np.stack([s0, d, k]), iters, flags

    def __repr__(self) -> str:
        return (
            f"DkiModel(bvals={self.levels.tolist()}, method={self.method.value!r}, "
            f"dki_bmin={self.dki_bmin:g})"
        )


def fit(
    signal: ArrayLike,
    bvals: ArrayLike,
    *,
    method: DkiMethod | str = DkiMethod.NLS,
    mask: ArrayLike | None = None,
    dki_bmin: float = 0.0,
    bounds: Bounds = DEFAULT_BOUNDS,
    sigma: float | None = None,
) -> DkiFit:
    """Fit DKI to ``signal`` (b axis last): a thin wrapper around :class:`DkiModel`."""
    model = DkiModel(bvals, method=method, dki_bmin=dki_bmin, bounds=bounds, sigma=sigma)
    return model.fit(signal, mask=mask)
