"""Mono-exponential apparent diffusion coefficient (ADC) on a declared b subset.

ADC is a separate quantity from the kurtosis model's Dapp: ln S(b) = ln S0 − b·ADC fitted on a
few b-values only. The breast convention (EUSOBI, Baltzer et al., Eur Radiol 2020) is b = 0 or 50
and b = 800 s/mm²; which b enter the fit changes the number, so the subset is a recorded setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicom_node.series.bvalues import B0_THRESHOLD, GROUP_REL_TOL

__all__ = ["DEFAULT_ADC_HIGH_B", "AdcFit", "fit_adc", "select_adc_bvals"]

#: High b of the default pair (EUSOBI recommendation).
DEFAULT_ADC_HIGH_B = 800.0
#: Candidates for the low b of the default pair, in order of preference (lowest present wins).
DEFAULT_ADC_LOW_B = (0.0, 50.0)


def _matches(b: NDArray[np.float64], target: float) -> NDArray[np.bool_]:
    if target < B0_THRESHOLD:
        return b < B0_THRESHOLD
    return np.abs(b - target) <= GROUP_REL_TOL * target


def select_adc_bvals(
    bvals: ArrayLike, adc_bvals: tuple[float, ...] | None = None
) -> tuple[tuple[float, ...], NDArray[np.intp]]:
    """Resolve the ADC b subset against the acquired b-values.

    ``adc_bvals=None`` means the default: the lowest of b = 0 / 50 that is present, and 800.
    Returns the nominal b-values used and the indices of the acquisitions that match them
    (nearly equal b within ``GROUP_REL_TOL``, 2 %; b < 5 s/mm² as 0). Raises ``ValueError``
    naming what is missing.
    """
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if adc_bvals is None:
        low = next((v for v in DEFAULT_ADC_LOW_B if _matches(b, v).any()), None)
        if low is None:
            raise ValueError(
                f"default ADC needs b = 0 or 50 s/mm²; acquired b-values are {b.tolist()}"
            )
        wanted: tuple[float, ...] = (low, DEFAULT_ADC_HIGH_B)
    else:
        wanted = tuple(float(v) for v in adc_bvals)
    if len(set(wanted)) < 2:
        raise ValueError(f"ADC needs at least two distinct b-values, got {wanted}")
    idx: list[int] = []
    for v in wanted:  # a handful of b-values
        hit = np.flatnonzero(_matches(b, v))
        if hit.size == 0:
            raise ValueError(f"ADC b = {v:g} s/mm² not acquired; b-values are {b.tolist()}")
        idx.extend(int(i) for i in hit)
    return wanted, np.array(sorted(set(idx)), dtype=np.intp)


@dataclass(frozen=True)
class AdcFit:
    """ADC map (mm²/s), extrapolated S0 and the validity mask, with the b subset used."""

    params: NDArray[np.float64]  # (..., 2): S0, ADC
    valid: NDArray[np.bool_]  # every signal in the subset was positive and finite
    b_values: tuple[float, ...]  # nominal b-values used (s/mm²)
    exact_b_values: tuple[float, ...]  # the acquired values that entered the fit

    @cached_property
    def adc(self) -> NDArray[np.float64]:
        return self.params[..., 1]

    @cached_property
    def s0(self) -> NDArray[np.float64]:
        return self.params[..., 0]


def fit_adc(
    signal: ArrayLike,
    bvals: ArrayLike,
    *,
    adc_bvals: tuple[float, ...] | None = None,
    mask: ArrayLike | None = None,
) -> AdcFit:
    """Log-linear least-squares ADC on the b subset, all voxels at once (b axis last).

    With two b-values this is the familiar ln(S_low/S_high)/(b_high − b_low). Voxels with a
    non-positive signal in the subset (or outside ``mask``) get ADC = 0 and ``valid = False``.
    """
    arr = np.asarray(signal)
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if arr.shape[-1] != b.size:
        raise ValueError(f"signal has {arr.shape[-1]} b entries, bvals has {b.size}")
    nominal, idx = select_adc_bvals(b, adc_bvals)
    sub = arr[..., idx].astype(np.float64)
    bs = b[idx]
    valid = np.all(np.isfinite(sub) & (sub > 0), axis=-1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != valid.shape:
            raise ValueError(f"mask shape {m.shape} does not match {valid.shape}")
        valid &= m
    logs = np.log(np.where(valid[..., None], sub, 1.0))
    # Ordinary least squares of ln S on b: slope = −ADC (closed form, vectorised).
    bc = bs - bs.mean()
    slope = (logs @ bc) / float(bc @ bc)
    intercept = logs.mean(axis=-1) - slope * bs.mean()
    params = np.stack([np.exp(intercept), -slope], axis=-1)
    params[~valid] = 0.0
    return AdcFit(
        params=params,
        valid=valid,
        b_values=nominal,
        exact_b_values=tuple(float(v) for v in bs),
    )
