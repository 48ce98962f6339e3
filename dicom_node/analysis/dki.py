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
are BLAS products over the b axis. Each Levenberg–Marquardt iteration, run in float32, is one
``exp`` and five elementwise passes over the ``(n_b, M)`` block, three small BLAS products that
give the cost and the b-moments of the next normal matrix, and ~70 passes over ``(M,)`` vectors
(the 3×3 systems in scaled unknowns, solved by LDLᵀ; the box constraints; the step acceptance).
A voxel's result is stored when it converges and finished voxels leave the working arrays; the
slow tail of every block is pooled into one second pass. Blocks bound the memory on a whole
breast volume and may be spread over threads (``n_threads``).
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


class _WlsDesign:
    """Weight matrices of the log-linear WLS normal equations, built once per b set.

    With the weights w = n·S² written as n times a per-voxel factor u, the six distinct entries
    of XᵀWX are one BLAS product ``normal @ u`` and XᵀW·log S one ``rhs @ (u·log S)``: two
    passes over the block instead of nine weighted sums.
    """

    def __init__(self, b: NDArray[Any], n: NDArray[Any]) -> None:
        x0, x1, one = -b, b * b / 6.0, np.ones_like(b)
        self.design = np.stack([x0, x1, one], axis=1)  # (n_b, 3): log S = X·(D, DK, ln S0)
        self.normal = np.stack([x0 * x0, x0 * x1, x0, x1 * x1, x1, one]) * n
        self.rhs = np.stack([x0, x1, one]) * n

    def solve(self, u: NDArray[Any], logy: NDArray[Any]) -> tuple[NDArray[Any], ...]:
        """Weighted solution (D, D²K, ln S0) for weights n·u, each ``(M,)``.

        float64 (the ``wls`` method, held to DIPY at 1e-9) uses the adjugate; the float32 start
        of the iterative fits the cheaper LDLᵀ (XᵀWX is positive definite).
        """
        a = self.normal @ u
        if u.dtype == np.float64:
            r = self.rhs @ (u * logy)
            return _solve3(a[0], a[1], a[2], a[3], a[4], a[5], r[0], r[1], r[2])
        g = (self.rhs @ (u * logy)) * -1.0  # _ldl3 solves A·x = −g
        return _ldl3(a[0], a[1], a[2], a[3], a[4], a[5], g[0], g[1], g[2])


def _wls_params(sol: tuple[NDArray[Any], ...]) -> NDArray[Any]:
    """(D, D²K, ln S0) → stacked (S0, D, K)."""
    d, dk, lns0 = sol
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


def _ldl3(
    a00: NDArray[Any],
    a01: NDArray[Any],
    a02: NDArray[Any],
    a11: NDArray[Any],
    a12: NDArray[Any],
    a22: NDArray[Any],
    g0: NDArray[Any],
    g1: NDArray[Any],
    g2: NDArray[Any],
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """x = −A⁻¹·g for symmetric positive definite 3×3 systems of every voxel, by LDLᵀ.

    The damped Gauss–Newton matrix is positive definite, so the factorisation needs no pivoting
    and takes ~25 array operations where the adjugate takes ~40.
    """
    i0 = 1.0 / a00
    l10 = a01 * i0
    l20 = a02 * i0
    i1 = 1.0 / (a11 - l10 * a01)
    u = a12 - l20 * a01
    l21 = u * i1
    z1 = l10 * g0 - g1
    x2 = (l20 * g0 - g2 - l21 * z1) / (a22 - l20 * a02 - l21 * u)
    x1 = z1 * i1 - l21 * x2
    x0 = (a01 * x1 + a02 * x2 + g0) * -i0
    return x0, x1, x2


def _lm_normal(th: NDArray[Any], q: NDArray[Any], lam: NDArray[Any]) -> tuple[NDArray[Any], ...]:
    """Damped normal matrix (a00, a01, a02, a11, a12, a22) and scaled gradient g1 of a block.

    In the unknowns scaled by (1, S0, S0·D²/6) the entries are b-moments: a02 = m2, a12 =
    c·m4 − m3, a22 = m4, g0 = rho0, g2 = rho2 with c = DK/3; Marquardt's damping multiplies the
    diagonal by 1 + λ.
    """
    dt = th.dtype.type
    m0, m1, m2, m3, m4, rho1, rho2 = q[1], q[2], q[3], q[4], q[5], q[7], q[8]
    c1 = th[1] * th[2] * dt(1.0 / 3.0)
    a01 = c1 * m2 - m1
    a12 = c1 * m4 - m3
    a11 = c1 * (a12 - m3) + m2
    g1 = c1 * rho2 - rho1
    damp = lam + dt(1.0)
    return m0 * damp, a01, m2, a11 * damp, a12, m4 * damp, g1


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
    compact_at: float = 0.25,
) -> tuple[NDArray[Any], NDArray[np.intp]]:
    """Projected Levenberg–Marquardt (Marquardt's diagonal scaling) for all voxels of a block.

    ``y`` is ``(n_b, M)``, ``theta`` ``(3, M)`` = (S0, D, K) in internal units. The Jacobian
    columns are S0·E·(b²·DK/3 − b) and S0·E·b²·D²/6 besides E; scaling the unknowns by
    (1, S0, S0·D²/6) — which leaves Marquardt's step unchanged — makes every entry of JᵀJ and
    Jᵀr a b-moment Σ n·bᵖ·E² (p ≤ 4) or Σ n·bᵖ·E·r (p ≤ 2), times at most the scalar DK/3.
    Those moments and the cost Σ n·r² of a trial point come out of three small BLAS products;
    they are kept per voxel, so E and r never outlive the evaluation and a rejected step
    restores nine numbers. The 3×3 systems are solved by LDLᵀ. Parameters on a bound whose
    descent points out of the box are frozen for the step (an active set); trial points are
    projected onto the box and kept only if they lower the cost. A voxel has converged when a
    step changes its cost by ≤ tol (relative) or the predicted decrease is ≤ 10·tol; its result
    is stored then, and finished voxels leave the working arrays once ``compact_at`` of them
    have finished (a gather of ~20 rows costs about a tenth of an iteration). S0 has no upper
    bound (``hi[0]`` is inf). Returns parameters and iterations.
    """
    dt = theta.dtype.type
    nb, m = y.shape
    lo_c, hi_c = lo[:, None], hi[:, None]
    out = np.empty((3, m), dtype=theta.dtype)
    iters = np.full(m, max_iter, dtype=np.intp)
    ids = np.arange(m)
    design = np.stack([-b, b * b / 6.0], axis=1)  # exponent = design · (D, D²K)
    moments = np.stack([n * b**p for p in range(5)])
    n_row, rho_moments = n[None, :], np.ascontiguousarray(moments[:3])
    e_buf, r_buf = np.empty((nb, m), dtype=dt), np.empty((nb, m), dtype=dt)
    s_buf = np.empty((3 * nb, m), dtype=dt)
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    eps_lo, eps_hi = lo + 1e-9 * span, hi - 1e-9 * span
    tol10 = dt(10.0 * tol)

    def free(x: NDArray[Any], g: NDArray[Any], p: int) -> NDArray[Any]:
        """1 where parameter ``p`` may move; 0 where it sits on a bound and descent leaves."""
        pinned = ((x <= eps_lo[p]) & (g > 0)) | ((x >= eps_hi[p]) & (g < 0))
        return np.logical_not(pinned).astype(dt)

    def evaluate(th: NDArray[Any], yw: NDArray[Any], sw: NDArray[Any] | None) -> NDArray[Any]:
        """Sums (cost, m0..m4, rho0..rho2) at ``th``; fills its 4th row with D²K."""
        k = th.shape[1]
        e, r, s = e_buf[:, :k], r_buf[:, :k], s_buf[:, :k]
        q = np.empty((9, k), dtype=dt)
        np.multiply(th[1], th[1], out=th[3])
        th[3] *= th[2]
        np.matmul(design, th[1::2], out=e)
        np.exp(e, out=e)
        np.multiply(e, th[0], out=r)
        if sw is None:
            r -= yw
        else:
            mean, dmean = _rician_mean(r, sw)
            np.subtract(mean, yw, out=r)
            e *= dmean  # Jacobian of E[|S|]: chain rule through dE/dS
        np.multiply(r, r, out=s[:nb])
        np.multiply(e, e, out=s[nb : 2 * nb])
        np.multiply(e, r, out=s[2 * nb :])
        # Three small products: one block-diagonal product measured 1.7x slower (OpenBLAS).
        np.matmul(n_row, s[:nb], out=q[:1])
        np.matmul(moments, s[nb : 2 * nb], out=q[1:6])
        np.matmul(rho_moments, s[2 * nb :], out=q[6:])
        return q

    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        th = np.empty((4, m), dtype=dt)  # S0, D, K and D²K (filled by evaluate)
        np.clip(theta, lo_c, hi_c, out=th[:3])
        yw, sw = y, sigma
        q = evaluate(th, yw, sw)
        lam = np.full(m, 1e-3, dtype=dt)
        fin = np.zeros(m, dtype=bool)  # converged and stored, idling until the next compaction
        n_fin = 0
        for it in range(max_iter):
            s0, d, k = th[0], th[1], th[2]
            cost, rho0 = q[0], q[6]
            a00, a01, a02, a11, a12, a22, g1 = _lm_normal(th, q, lam)
            g2 = q[8]
            # Active set: a parameter on a bound whose descent points out of the box gets an
            # identity row and column and a zero gradient (0/1 multipliers, no branches). S0
            # reaches its bound (1e-9 of the block maximum) only after a failed step: test
            # cheaply first. The scaling keeps the sign of every gradient entry.
            if bool((s0 <= eps_lo[0]).any()):
                f0 = free(s0, rho0, 0)
                a00 = (a00 - 1) * f0 + 1
                a01 = a01 * f0
                a02 = a02 * f0
                rho0 = rho0 * f0
            f1, f2 = free(d, g1, 1), free(k, g2, 2)
            a11 = (a11 - 1) * f1 + 1
            a22 = (a22 - 1) * f2 + 1
            a01 = a01 * f1
            a02 = a02 * f2
            a12 = a12 * (f1 * f2)
            g1 = g1 * f1
            g2 = g2 * f2
            x0, x1, x2 = _ldl3(a00, a01, a02, a11, a12, a22, rho0, g1, g2)
            # Gauss–Newton predicted decrease −g·dx (invariant under the scaling): when it is
            # below 10·tol·cost the voxel converges with this step, saving the confirming
            # iteration (measured: Kapp moves < 0.005 at the 99th percentile).
            tiny = np.abs(rho0 * x0 + g1 * x1 + g2 * x2) <= tol10 * cost
            trial = np.empty((4, th.shape[1]), dtype=dt)
            np.add(s0, x0, out=trial[0])
            inv = dt(1.0) / s0
            np.multiply(x1, inv, out=trial[1])
            trial[1] += d
            np.multiply(x2, inv * dt(6.0) / (d * d), out=trial[2])
            trial[2] += k
            # A NaN step (singular system) survives the projection, gives a NaN cost and is
            # rejected below like any step that does not lower the cost.
            np.clip(trial[:3], lo_c, hi_c, out=trial[:3])
            qt = evaluate(trial, yw, sw)
            cost_t = qt[0]
            better = cost_t < cost
            # Converged when the step changes the cost by less than tol (relative) either way;
            # such a step is as good as the current point and is kept.
            flat = np.abs(cost - cost_t) <= tol * cost
            rej = np.flatnonzero(~(better | flat))
            if rej.size:  # most steps are accepted: patch back the rejected columns only
                for new_row, old_row in zip(trial[:3], th, strict=False):
                    new_row.put(rej, old_row.take(rej))
                qt[:, rej] = q[:, rej]
            lam *= np.where(better, dt(0.1), dt(10.0))
            np.maximum(lam, dt(1e-9), out=lam)
            new = flat | (better & tiny) | (lam > 1e7)
            if n_fin:
                new &= ~fin
            th, q = trial, qt
            if not new.any():
                continue
            done = np.flatnonzero(new)
            at = ids[done]
            for p in range(3):  # row by row: 1-D take/put beat 2-D fancy indexing ~5x
                out[p, at] = th[p].take(done)
            iters[ids[done]] = it + 1
            fin |= new
            n_fin += done.size
            if n_fin == fin.size:
                return out, iters
            if n_fin >= compact_at * fin.size:
                keep = ~fin  # np.compress gathers columns ~3x faster than boolean indexing
                ids, lam = ids[keep], lam[keep]
                # Row 3 of th (D²K) is rewritten by the next evaluation: three rows suffice.
                th, q, yw = (np.compress(keep, a, axis=1) for a in (th[:3], q, yw))
                if sw is not None:
                    sw = sw[keep]
                fin = np.zeros(ids.size, dtype=bool)
                n_fin = 0
    left = np.flatnonzero(~fin)
    out[:, ids[left]] = th[:3, left]
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
        p_cols = [p_flat[:, j] for j in range(3)]
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
            for col, row in zip(p_cols, p, strict=True):  # 1-D scatters: 2x faster than rows
                col[sel] = row
            i_flat[sel], f_flat[sel] = it, fl
            pending = it >= first
            if self.method is not DkiMethod.WLS and pending.any():
                leftovers.append(sel[pending])

        def second_pass(start: int) -> None:
            sel = rest[start : start + self.chunk_size]
            p, it, fl = self._fit_block(
                gather(sel), sigma, theta0=p_flat[sel].T, max_iter=self.max_iter - first
            )
            for col, row in zip(p_cols, p, strict=True):
                col[sel] = row
            f_flat[sel] = fl
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
        inv_scale = dt(1.0) / scale
        yn = y * inv_scale
        np.maximum(yn, 1e-4 * inv_scale, out=yn)  # DIPY's MIN_POSITIVE_SIGNAL, scaled units
        b, n = self._b.astype(dt), self.counts.astype(dt)
        wd = _WlsDesign(b, n)
        dlo, dhi = self.bounds.dapp
        klo, khi = self.bounds.kapp
        lo = np.array([1e-9, max(dlo * _B_SCALE, 1e-6), klo], dtype=dt)
        hi = np.array([np.inf, dhi * _B_SCALE, khi], dtype=dt)
        sig_n = None if sigma is None else dt(sigma) * inv_scale
        if theta0 is not None:
            theta = np.stack([theta0[0] * inv_scale, theta0[1] * _B_SCALE, theta0[2]]).astype(dt)
        elif self.method is DkiMethod.NLS_RICIAN and sig_n is not None:
            # Start from the squared-signal bias correction: A² ≈ E[S²] − 2σ².
            ys = np.sqrt(np.maximum(yn * yn - 2.0 * sig_n * sig_n, (0.5 * sig_n) ** 2))
            theta = _wls_params(wd.solve(ys * ys, np.log(ys)))
        else:
            logy = np.log(yn)
            sol = wd.solve(yn * yn, logy)
            if self.method is not DkiMethod.NLS:
                theta = _wls_params(sol)
            else:
                # One reweighting with the predicted signal moves the start towards the
                # magnitude least-squares optimum (fewer Levenberg–Marquardt iterations). The
                # log prediction is X·(D, DK, ln S0), so the squared weights are one exp.
                with np.errstate(over="ignore", invalid="ignore"):
                    u = np.exp((2.0 * wd.design).astype(dt) @ np.stack(sol))
                    theta = _wls_params(wd.solve(u, logy))
                # Where the reweighted solve failed (overflowing prediction), keep the first.
                failed = np.flatnonzero(~np.isfinite(theta.sum(axis=0)))
                if failed.size:
                    theta[:, failed] = _wls_params(tuple(x[failed] for x in sol))
        iters = np.zeros(y.shape[1], dtype=np.intp)
        if self.method is DkiMethod.WLS:
            out = theta
        else:
            bad = ~np.isfinite(theta.sum(axis=0))
            if bad.any():
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
