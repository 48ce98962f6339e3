"""Numeric kernels of the DKI fit: per-voxel 3×3 solves, the WLS start and Levenberg–Marquardt.

Every function works on whole blocks of voxels at once — arrays of shape ``(M,)`` or
``(n_b, M)`` — so no Python loop runs per voxel. :mod:`.dki` owns the model, its units and
flags; this module only knows the signal S0·exp(−b·D + b²·D²·K/6) in internal units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "NoncentralChiMean",
    "WlsDesign",
    "bessel_i0e_i1e",
    "ldl3",
    "levenberg_marquardt",
    "noise_floor_mean",
    "rician_mean",
    "single_threaded_blas",
    "solve3",
    "wls_params",
]

_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)


def solve3(
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


class WlsDesign:
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
            return solve3(a[0], a[1], a[2], a[3], a[4], a[5], r[0], r[1], r[2])
        g = (self.rhs @ (u * logy)) * -1.0  # ldl3 solves A·x = −g
        return ldl3(a[0], a[1], a[2], a[3], a[4], a[5], g[0], g[1], g[2])


def wls_params(sol: tuple[NDArray[Any], ...]) -> NDArray[Any]:
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


def bessel_i0e_i1e(z: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
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


def rician_mean(
    a: NDArray[np.float64], sigma: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """E[|S|] of a Rician variable with amplitude ``a`` and noise ``sigma``, and dE/da.

    E = σ√(π/2)·[(1+2z)·I0e(z) + 2z·I1e(z)] with z = a²/(4σ²) (Laguerre L½ written with
    exponentially scaled Bessel functions, which stay finite at any SNR); dE/da = √(π/2)·
    a/(2σ)·[I0e(z) + I1e(z)].
    """
    z = a * a / (4.0 * sigma * sigma)
    i0, i1 = bessel_i0e_i1e(z)
    e = sigma * _SQRT_HALF_PI * ((1.0 + 2.0 * z) * i0 + 2.0 * z * i1)
    de = _SQRT_HALF_PI * a / (2.0 * sigma) * (i0 + i1)
    return e, de


class NoncentralChiMean:
    """E[m] of a non-central χ magnitude (N coils, sum of squares) and dE/dA, from a table.

    m = √(Σ_c |s_c + n_c|²) over N channels of complex Gaussian noise σ with Σ|s_c|² = A² is
    non-central χ with 2N degrees of freedom (Constantinides et al., Magn Reson Med 1997; the
    noise-floor model of Koay & Basser, J Magn Reson 2006, and Dietrich et al., Magn Reson
    Imaging 2008). With a = A/σ:

        E[m] = σ·β_N·₁F₁(−½; N; −a²/2),  β_N = √2·Γ(N+½)/Γ(N)
        dE/dA = β_N·a/(2N)·₁F₁(½; N+1; −a²/2)

    (N = 1 is the Rician mean of :func:`rician_mean`). N may be an effective, non-integer coil
    count (Aja-Fernández et al. 2009). Both functions of a are tabulated once per N on a uniform
    grid (step 0.01, linear interpolation: error < 1e−5·σ) up to ``a_max`` and continued by the
    asymptotic series E/σ = a + (2N−1)/(2a), so a call is a handful of array passes whatever N.
    """

    def __init__(self, coils: float, dtype: type[np.floating[Any]] = np.float64) -> None:
        from scipy import special

        if not (coils >= 1.0 and math.isfinite(coils)):
            raise ValueError(f"coil count must be finite and ≥ 1, got {coils}")
        self.coils = float(coils)
        self.step = 0.01
        self.a_max = max(60.0, 10.0 * self.coils)
        a = np.arange(0.0, self.a_max + 2.5 * self.step, self.step)
        n = self.coils
        beta = math.sqrt(2.0) * math.exp(special.gammaln(n + 0.5) - special.gammaln(n))
        x = -0.5 * a * a
        self._dt = np.dtype(dtype).type
        self._mean = (beta * special.hyp1f1(-0.5, n, x)).astype(dtype)
        self._slope = (beta * a / (2.0 * n) * special.hyp1f1(0.5, n + 1.0, x)).astype(dtype)
        self._last = a.size - 2
        self._c = self._dt(n - 0.5)  # (2N − 1)/2 of the asymptotic series

    def __call__(
        self, amplitude: NDArray[Any], sigma: NDArray[Any]
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """(E[m], dE/dA) for amplitudes ``(n_b, M)`` and per-voxel noise ``sigma`` ``(M,)``."""
        dt = self._dt
        a = np.abs(amplitude) / sigma
        u = a * dt(1.0 / self.step)
        idx = np.minimum(u, dt(self._last)).astype(np.intp)
        frac = np.minimum(u - idx, dt(1.0))
        m0, s0 = self._mean.take(idx), self._slope.take(idx)
        idx += 1
        mean = m0 + frac * (self._mean.take(idx) - m0)
        slope = s0 + frac * (self._slope.take(idx) - s0)
        far = a > dt(self.a_max)
        if far.any():
            af = a[far]
            mean[far] = af + self._c / af
            slope[far] = dt(1.0) - self._c / (af * af)
        mean *= sigma
        return mean, slope


@lru_cache(maxsize=8)
def _chi_table(coils: float, dtype_name: str) -> NoncentralChiMean:
    """One table per (N, precision): built in ~10 ms, reused by every block of a fit."""
    return NoncentralChiMean(coils, np.dtype(dtype_name).type)


def noise_floor_mean(
    coils: float, dtype: type[np.floating[Any]] = np.float64
) -> Callable[[NDArray[Any], NDArray[Any]], tuple[NDArray[Any], NDArray[Any]]]:
    """The expected magnitude E[m](A, σ) and dE/dA for ``coils`` channels.

    N = 1 returns :func:`rician_mean` itself (the Bessel form, unchanged results and speed);
    N > 1 a cached :class:`NoncentralChiMean` table.
    """
    if coils == 1.0:
        return rician_mean
    return _chi_table(float(coils), np.dtype(dtype).name)


def ldl3(
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


def levenberg_marquardt(
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
    coils: float = 1.0,
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
    bound (``hi[0]`` is inf). With ``sigma`` the model is the expected magnitude of the noise
    floor for ``coils`` channels (:func:`noise_floor_mean`: Rician at N = 1, non-central χ
    above). Returns parameters and iterations.
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
    products_buf = np.empty((3 * nb, m), dtype=dt)  # r², E², E·r per b
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    eps_lo, eps_hi = lo + 1e-9 * span, hi - 1e-9 * span
    tol10 = dt(10.0 * tol)
    expected = noise_floor_mean(coils, dt) if sigma is not None else rician_mean

    def free(x: NDArray[Any], g: NDArray[Any], p: int) -> NDArray[Any]:
        """1 where parameter ``p`` may move; 0 where it sits on a bound and descent leaves."""
        pinned = ((x <= eps_lo[p]) & (g > 0)) | ((x >= eps_hi[p]) & (g < 0))
        return np.logical_not(pinned).astype(dt)

    def evaluate(th: NDArray[Any], yw: NDArray[Any], sw: NDArray[Any] | None) -> NDArray[Any]:
        """Sums (cost, m0..m4, rho0..rho2) at ``th``; fills its 4th row with D²K."""
        k = th.shape[1]
        e, r, products = e_buf[:, :k], r_buf[:, :k], products_buf[:, :k]
        q = np.empty((9, k), dtype=dt)
        np.multiply(th[1], th[1], out=th[3])
        th[3] *= th[2]
        np.matmul(design, th[1::2], out=e)
        np.exp(e, out=e)
        np.multiply(e, th[0], out=r)
        if sw is None:
            r -= yw
        else:
            mean, dmean = expected(r, sw)
            np.subtract(mean, yw, out=r)
            e *= dmean  # Jacobian of E[|S|]: chain rule through dE/dS
        np.multiply(r, r, out=products[:nb])
        np.multiply(e, e, out=products[nb : 2 * nb])
        np.multiply(e, r, out=products[2 * nb :])
        # Three small products: one block-diagonal product measured 1.7x slower (OpenBLAS).
        np.matmul(n_row, products[:nb], out=q[:1])
        np.matmul(moments, products[nb : 2 * nb], out=q[1:6])
        np.matmul(rho_moments, products[2 * nb :], out=q[6:])
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
            x0, x1, x2 = ldl3(a00, a01, a02, a11, a12, a22, rho0, g1, g2)
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


def single_threaded_blas() -> AbstractContextManager[object]:
    """Limit BLAS to one thread (threadpoolctl, shipped with scikit-learn); no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
