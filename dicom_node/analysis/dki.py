"""Diffusion kurtosis imaging (DKI) of trace-weighted breast DWI: a model/fit API in DIPY's style.

The signal model is Jensen's cumulant expansion for one (trace) direction (Jensen et al., Magn
Reson Med 2005;53:1432):

    S(b) = S0 · exp(−b·Dapp + b²·Dapp²·Kapp / 6)

which is only physical while the curve falls, b < 3 / (Dapp·Kapp). Three fit methods are offered:

- ``wls``: log-linear weighted least squares with weights n·S² — numerically the same estimator as
  DIPY's mean-signal DKI (``dipy.reconst.msdki``, Henriques et al., NeuroImage 2018), solved for
  all voxels at once.
- ``nls`` (this model's default, as it needs no σ): bounded Levenberg–Marquardt on the
  magnitudes, started from ``wls`` reweighted once with its predicted signal.
- ``nls_rician``: the same, but fitting the Rician expectation E[|S|] (Gudbjartsson & Patz, Magn
  Reson Med 1995) so the noise floor at high b no longer inflates Kapp. The node's analysis
  default (``models.contract.DEFAULT_FIT``, after MP-PCA denoising) where σ is known.

All voxels of a block are solved together (no Python loop per voxel): the WLS normal equations
are BLAS products over the b axis. Each Levenberg–Marquardt iteration, run in float32, is one
``exp`` and five elementwise passes over the ``(n_b, M)`` block, three small BLAS products that
give the cost and the b-moments of the next normal matrix, and ~70 passes over ``(M,)`` vectors
(the 3×3 systems in scaled unknowns, solved by LDLᵀ; the box constraints; the step acceptance).
A voxel's result is stored when it converges and finished voxels leave the working arrays; the
slow tail of every block is pooled into one second pass. Blocks bound the memory on a whole
breast volume and may be spread over threads (``n_threads``).

This module holds the model, its settings and flags; the numeric kernels live in
:mod:`.dki_kernels`, the noise σ and background mask in :mod:`.noise`, and the grouping of nearly
equal b-values into levels in :func:`dicom_node.series.bvalues.bvalue_levels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicom_node.analysis.dki_kernels import (
    WlsDesign,
    levenberg_marquardt,
    single_threaded_blas,
    wls_params,
)
from dicom_node.analysis.noise import background_mask, estimate_sigma
from dicom_node.series.bvalues import bvalue_levels

__all__ = [
    "DEFAULT_BOUNDS",
    "Bounds",
    "DkiFit",
    "DkiMethod",
    "DkiModel",
    "DkiSettings",
    "FitFlag",
    "cramer_rao_bound",
    "fit",
]

_B_SCALE = 1000.0  # internal b unit: ms/µm² (b/1000), so Dapp is in µm²/ms = 10⁻³ mm²/s


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
    #: Coil count N of the noise-floor model ``nls_rician`` used (1 = Rician; non-central χ above).
    coils: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "b_values": list(self.bvals),
            "dki_bmin": self.dki_bmin,
            "bounds": self.bounds.to_dict(),
            "sigma": self.sigma,
            "coils": self.coils,
        }


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

    def fraction_at_bound(self, mask: NDArray[np.bool_] | None = None) -> float:
        """Share of the fitted voxels (inside ``mask`` if given) carrying AT_BOUND.

        Background voxels are not fitted and do not count; 0 when no voxel was fitted.
        """
        fitted = ~self.has_flag(FitFlag.BACKGROUND)
        if mask is not None:
            fitted = fitted & np.asarray(mask, dtype=bool)
        n = int(fitted.sum())
        return float((self.has_flag(FitFlag.AT_BOUND) & fitted).sum()) / n if n else 0.0

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
        Noise σ in signal units (kept for older callers: prefer ``fit(data, sigma=...)``);
        estimated from the background at fit time when neither is given.
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
        levels, labels = bvalue_levels(b)
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

    def settings(self, sigma: float | None = None, coils: float = 1.0) -> DkiSettings:
        return DkiSettings(
            method=self.method,
            bvals=tuple(float(v) for v in self.levels),
            dki_bmin=self.dki_bmin,
            bounds=self.bounds,
            sigma=self.sigma if sigma is None else sigma,
            coils=float(coils),
        )

    def fit(
        self,
        data: ArrayLike,
        *,
        mask: ArrayLike | None = None,
        sigma: float | None = None,
        coils: float = 1.0,
    ) -> DkiFit:
        """Fit every masked voxel of ``data`` (b axis last) in vectorised 2-D blocks.

        ``sigma`` is the noise σ of *this* data (signal units); it overrides the model's
        (deprecated) ``sigma`` and, when both are None, is estimated from the air background.
        It belongs to the data, not the acquisition, hence a fit argument (DIPY's style).
        ``coils`` is the effective coil count N of the noise (``provenance.noise``): ``nls_rician``
        then fits the non-central-χ expectation with 2N degrees of freedom (Koay & Basser 2006),
        the right noise floor for sum-of-squares combined multi-coil data; N = 1 is Rician.
        Other methods ignore it (recorded in the settings as 1).

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
        if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be positive, got {sigma}")
        if not (coils >= 1.0 and math.isfinite(coils)):
            raise ValueError(f"coils must be finite and ≥ 1, got {coils}")
        if self.method is not DkiMethod.NLS_RICIAN:
            coils = 1.0
        if sigma is None:
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
            p, it, fl = self._fit_block(gather(sel), sigma, max_iter=first, coils=coils)
            for col, row in zip(p_cols, p, strict=True):  # 1-D scatters: 2x faster than rows
                col[sel] = row
            i_flat[sel], f_flat[sel] = it, fl
            pending = it >= first
            if self.method is not DkiMethod.WLS and pending.any():
                leftovers.append(sel[pending])

        def second_pass(start: int) -> None:
            sel = rest[start : start + self.chunk_size]
            p, it, fl = self._fit_block(
                gather(sel),
                sigma,
                theta0=p_flat[sel].T,
                max_iter=self.max_iter - first,
                coils=coils,
            )
            for col, row in zip(p_cols, p, strict=True):
                col[sel] = row
            f_flat[sel] = fl
            i_flat[sel] += it

        # The per-block BLAS products are small: a multi-threaded BLAS only adds hand-offs
        # (and stalls badly on a shared host), so keep it to one thread inside the fit.
        with single_threaded_blas():
            self._run(first_pass, range(0, flat_idx.size, self.chunk_size))
            if leftovers and self.max_iter > first:
                rest = np.concatenate(leftovers)
                self._run(second_pass, range(0, rest.size, self.chunk_size))
        return DkiFit(self, params, flags, self.settings(sigma, coils), iters)

    def _run(self, work: Callable[[int], None], starts: Sequence[int] | range) -> None:
        n = self.n_threads or 1
        if n <= 1 or len(starts) <= 1:
            for start in starts:
                work(start)
            return
        with ThreadPoolExecutor(max_workers=n) as pool:
            for fut in [pool.submit(work, start) for start in starts]:
                fut.result()

    def _fit_block(
        self,
        y: NDArray[Any],
        sigma: float | None,
        *,
        max_iter: int,
        theta0: NDArray[np.float64] | None = None,
        coils: float = 1.0,
    ) -> tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.uint8]]:
        """Fit a ``(n_levels, M)`` block; returns params ``(3, M)`` (S0, mm²/s, 1), iterations
        and flags. ``theta0`` (same units as the output) restarts from an earlier pass;
        ``coils`` is N of the noise-floor model of ``nls_rician``."""
        dt = y.dtype.type
        scale = y.max(axis=0)
        scale = np.where(scale > 0, scale, dt(1.0))
        inv_scale = dt(1.0) / scale
        yn = y * inv_scale
        np.maximum(yn, 1e-4 * inv_scale, out=yn)  # DIPY's MIN_POSITIVE_SIGNAL, scaled units
        b, n = self._b.astype(dt), self.counts.astype(dt)
        wd = WlsDesign(b, n)
        dlo, dhi = self.bounds.dapp
        klo, khi = self.bounds.kapp
        lo = np.array([1e-9, max(dlo * _B_SCALE, 1e-6), klo], dtype=dt)
        hi = np.array([np.inf, dhi * _B_SCALE, khi], dtype=dt)
        sig_n = None if sigma is None else dt(sigma) * inv_scale
        if theta0 is not None:
            theta = np.stack([theta0[0] * inv_scale, theta0[1] * _B_SCALE, theta0[2]]).astype(dt)
        elif self.method is DkiMethod.NLS_RICIAN and sig_n is not None:
            # Start from the squared-signal bias correction: A² ≈ E[S²] − 2N·σ².
            ys = np.sqrt(np.maximum(yn * yn - 2.0 * coils * sig_n * sig_n, (0.5 * sig_n) ** 2))
            theta = wls_params(wd.solve(ys * ys, np.log(ys)))
        else:
            logy = np.log(yn)
            sol = wd.solve(yn * yn, logy)
            if self.method is not DkiMethod.NLS:
                theta = wls_params(sol)
            else:
                # One reweighting with the predicted signal moves the start towards the
                # magnitude least-squares optimum (fewer Levenberg–Marquardt iterations). The
                # log prediction is X·(D, DK, ln S0), so the squared weights are one exp.
                with np.errstate(over="ignore", invalid="ignore"):
                    u = np.exp((2.0 * wd.design).astype(dt) @ np.stack(sol))
                    theta = wls_params(wd.solve(u, logy))
                # Where the reweighted solve failed (overflowing prediction), keep the first.
                failed = np.flatnonzero(~np.isfinite(theta.sum(axis=0)))
                if failed.size:
                    theta[:, failed] = wls_params(tuple(x[failed] for x in sol))
        iters = np.zeros(y.shape[1], dtype=np.intp)
        if self.method is DkiMethod.WLS:
            out = theta
        else:
            bad = ~np.isfinite(theta.sum(axis=0))
            if bad.any():
                theta[:, bad] = np.array([[1.0], [1.0], [0.5]], dtype=dt)
            rice = sig_n if self.method is DkiMethod.NLS_RICIAN else None
            out, iters = levenberg_marquardt(
                yn, b, n, lo, hi, theta, rice, max_iter=max_iter, tol=self.tol, coils=coils
            )
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
    coils: float = 1.0,
) -> DkiFit:
    """Fit DKI to ``signal`` (b axis last): a thin wrapper around :class:`DkiModel`."""
    model = DkiModel(bvals, method=method, dki_bmin=dki_bmin, bounds=bounds)
    return model.fit(signal, mask=mask, sigma=sigma, coils=coils)


def _rician_information_table() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """J(a) = σ²·Fisher information of a Rician sample about its amplitude A = a·σ.

    J(a) = E[(m·I₁(m·a)/I₀(m·a) − a)²] with m the unit-σ Rician magnitude; 0 at a = 0 (the
    magnitude of pure noise says nothing to first order about A), → 1 (Gaussian) at high a.
    Tabulated once by quadrature on a dense grid of m.
    """
    from scipy import special

    a = np.concatenate([np.linspace(0.0, 10.0, 201), np.linspace(10.25, 40.0, 120)])
    m = np.linspace(0.0, 60.0, 6001)[:, None]
    dm = float(m[1, 0] - m[0, 0])
    z = m * a[None, :]
    ratio = special.i1e(z) / special.i0e(z)
    # Rice pdf with exponent scaled for stability: m·exp(−(m−a)²/2)·I0e(m·a)
    pdf = m * np.exp(-0.5 * (m - a[None, :]) ** 2) * special.i0e(z)
    j = np.sum(pdf * (m * ratio - a[None, :]) ** 2, axis=0) * dm
    return a, np.minimum(j, 1.0)


_RICE_TABLE: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None


def cramer_rao_bound(
    s0: ArrayLike,
    dapp: ArrayLike,
    kapp: ArrayLike,
    bvals: ArrayLike,
    sigma: float,
    *,
    rician: bool = True,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Cramér–Rao lower bounds (standard deviations) of S0, Dapp (mm²/s) and Kapp per voxel.

    Why: an RMSE only means something against the limit any unbiased estimator can reach with
    these b-values and this noise. The Fisher matrix is Σ_b I(A_b)·∇S_b ∇S_bᵀ over every
    acquisition (repeats count), with I = 1/σ² (Gaussian) or the Rician information of the
    magnitude A_b (``rician=True``), which falls towards 0 as A_b sinks into the noise floor.
    """
    global _RICE_TABLE
    s0a, d, k = (np.asarray(v, dtype=np.float64) for v in (s0, dapp, kapp))
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    d_, k_, s0_ = d[..., None], k[..., None], s0a[..., None]
    sig = s0_ * np.exp(-b * d_ + (b * d_) ** 2 * k_ / 6.0)
    grad = np.stack(
        [
            sig / np.where(s0_ > 0, s0_, 1.0),
            sig * (-b + b * b * d_ * k_ / 3.0),
            sig * (b * d_) ** 2 / 6.0,
        ],
        axis=-1,
    )  # (..., n_b, 3)
    if rician:
        if _RICE_TABLE is None:
            _RICE_TABLE = _rician_information_table()
        ta, tj = _RICE_TABLE
        info = np.interp(sig / sigma, ta, tj, right=1.0) / sigma**2
    else:
        info = np.full(sig.shape, 1.0 / sigma**2)
    fisher = np.einsum("...b,...bi,...bj->...ij", info, grad, grad)
    with np.errstate(invalid="ignore"):
        cov = np.linalg.pinv(fisher)
    var = np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0.0, None)
    sd = np.sqrt(var)
    return sd[..., 0], sd[..., 1], sd[..., 2]
