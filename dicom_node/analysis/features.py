"""IBSI first-order histogram features of the parameter maps inside the tumour ROI.

Definitions follow the Image Biomarker Standardisation Initiative reference manual (Zwanenburg
et al., Radiology 2020;295:328; arXiv:1612.07003), sections "intensity-based statistical
features" and "intensity histogram features":

- mean; median and percentiles by numpy's default linear interpolation rule;
- skewness m3/m2^(3/2) and kurtosis m4/m2² − 3 from population (biased) central moments, both 0
  when the variance is 0; ``kurtosis="pearson"`` reports m4/m2² (PyRadiomics/MATLAB convention);
- entropy −Σ p·log2 p over the occupied bins of the *discretised* histogram. Fixed bin size:
  bin = ⌊(x − bin_min)/w⌋ + 1 (bin_min defaults to the ROI minimum); fixed bin number:
  bin = ⌊N·(x − min)/(max − min)⌋ + 1, the maximum going into bin N.

Feature names, units, the default bin widths and the conventions come from ``models.contract``,
the results contract the service and the model card share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicom_node.analysis.dki import FitFlag
from models.contract import (
    BIN_MIN,
    BIN_WIDTH,
    MAP_UNITS,
    PERCENTILES,
    QUANTITATIVE_NAMES,
    BinningMethod,
    KurtosisConvention,
    Map,
    PercentileRule,
    Statistic,
)

__all__ = [
    "DEFAULT_BIN_MIN",
    "DEFAULT_BIN_WIDTHS",
    "FEATURE_NAMES",
    "MAPS",
    "STATISTICS",
    "Binning",
    "BinningMethod",
    "KurtosisConvention",
    "MapFeatures",
    "discretise",
    "feature_key",
    "first_order",
    "map_features",
]

MAPS: tuple[str, ...] = tuple(m.value for m in Map)
STATISTICS: tuple[str, ...] = tuple(st.value for st in Statistic)
#: The 21 feature names published with every result (``{map}_{statistic}``).
FEATURE_NAMES = QUANTITATIVE_NAMES
DEFAULT_BIN_WIDTHS: Mapping[str, float] = {m.value: w for m, w in BIN_WIDTH.items()}
DEFAULT_BIN_MIN = BIN_MIN
UNITS: Mapping[str, str] = {m.value: u for m, u in MAP_UNITS.items()}


@dataclass(frozen=True)
class Binning:
    """How one set of values was discretised for its entropy (store it beside the value).

    The per-value record (with ``n_bins`` and ``below_bin_min``); the settings a result states
    are ``models.contract.Discretisation``.
    """

    method: BinningMethod
    bin_width: float | None = None
    bin_min: float | None = None
    n_bins: int | None = None
    #: Values below ``bin_min`` (fixed bin size); they fall in bins ≤ 0 and still count.
    below_bin_min: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "bin_width": self.bin_width,
            "bin_min": self.bin_min,
            "n_bins": self.n_bins,
            "below_bin_min": self.below_bin_min,
        }


def _percentile_key(q: float) -> str:
    return "p" + f"{q:g}".replace(".", "_")


def feature_key(map_name: str, statistic: str) -> str:
    """``{map}_{statistic}``; any percentile key (``p2_5``) is allowed, not only published ones."""
    return f"{map_name}_{statistic}"


def discretise(
    values: ArrayLike,
    *,
    bin_width: float | None = None,
    bin_min: float | None = None,
    n_bins: int | None = None,
) -> tuple[NDArray[np.int64], Binning]:
    """IBSI bin index (1-based) of every value, and the discretisation used.

    Give ``bin_width`` (fixed bin size, from ``bin_min`` or the minimum) or ``n_bins`` (fixed bin
    number over [min, max]), not both. There is no default: an entropy is meaningless without
    its discretisation (IBSI manual, section 2.7).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if (bin_width is None) == (n_bins is None):
        raise ValueError("give exactly one of bin_width (fixed bin size) or n_bins (fixed number)")
    if x.size == 0:
        raise ValueError("no values to discretise")
    if bin_width is not None:
        if not bin_width > 0:
            raise ValueError(f"bin_width must be > 0, got {bin_width}")
        lo = float(x.min()) if bin_min is None else float(bin_min)
        bins = np.floor((x - lo) / bin_width).astype(np.int64) + 1
        return bins, Binning(
            BinningMethod.FIXED_BIN_SIZE,
            bin_width=float(bin_width),
            bin_min=lo,
            below_bin_min=int((x < lo).sum()),
        )
    assert n_bins is not None
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    if bin_min is not None:
        raise ValueError("bin_min applies to fixed bin size only")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        bins = np.ones(x.size, dtype=np.int64)
    else:
        bins = np.floor(n_bins * (x - lo) / (hi - lo)).astype(np.int64) + 1
        bins = np.minimum(bins, n_bins)
    return bins, Binning(BinningMethod.FIXED_BIN_NUMBER, n_bins=int(n_bins))


def first_order(
    values: ArrayLike,
    *,
    percentiles: Sequence[float] = PERCENTILES,
    kurtosis: KurtosisConvention | str = KurtosisConvention.EXCESS,
    bin_width: float | None = None,
    bin_min: float | None = None,
    n_bins: int | None = None,
) -> dict[str, Any]:
    """IBSI first-order statistics of ``values`` (the voxels of one map inside the ROI).

    Returns floats under ``mean``, ``median``, ``p<q>`` for each percentile (``p5``, ``p95``;
    ``p2_5`` for 2.5), ``skewness``, ``kurtosis``, ``entropy`` (bits), plus ``n`` (voxel count),
    ``kurtosis_convention`` and ``discretisation`` (a dict). Non-finite values are rejected.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    conv = KurtosisConvention(kurtosis)
    if x.size == 0:
        raise ValueError("no voxels: first-order features need at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    mean = float(x.mean())
    dev = x - mean
    m2 = float(np.mean(dev * dev))
    if m2 > 0 and x.max() > x.min():  # identical values can leave m2 ~ 1e-38 by rounding
        skew = float(np.mean(dev**3)) / m2**1.5
        kurt = float(np.mean(dev**4)) / (m2 * m2) - 3.0
    else:  # IBSI: both are 0 for a flat distribution
        skew = kurt = 0.0
    if conv is KurtosisConvention.PEARSON:
        kurt += 3.0
    bins, disc = discretise(x, bin_width=bin_width, bin_min=bin_min, n_bins=n_bins)
    _, counts = np.unique(bins, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns −0.0 into 0.0
    out: dict[str, Any] = {"mean": mean, "median": float(np.median(x))}
    qs = [float(q) for q in percentiles]
    for q, v in zip(qs, np.percentile(x, qs), strict=True):
        out[_percentile_key(q)] = float(v)
    out.update(
        skewness=skew,
        kurtosis=kurt,
        entropy=entropy,
        n=int(x.size),
        kurtosis_convention=conv.value,
        discretisation=disc.to_dict(),
    )
    return out


@dataclass
class MapFeatures:
    """The 21 histogram features of the ADC, Dapp and Kapp maps inside one ROI."""

    features: dict[str, float]  # FEATURE_NAMES → value (ADC/Dapp in mm²/s)
    roi_voxels: int
    roi_volume_ml: float
    voxel_counts: dict[str, int]  # voxels that entered each map's histogram
    flag_counts: dict[str, int]  # DKI flags inside the ROI
    units: Mapping[str, str] = field(default_factory=lambda: dict(UNITS))
    settings: dict[str, Any] = field(default_factory=dict)


def map_features(
    maps: Mapping[str, NDArray[np.floating[Any]]],
    roi: NDArray[np.bool_],
    *,
    voxel_volume_mm3: float,
    valid: Mapping[str, NDArray[np.bool_]] | None = None,
    flags: NDArray[np.uint8] | None = None,
    bin_widths: Mapping[str, float] = DEFAULT_BIN_WIDTHS,
    bin_min: float = DEFAULT_BIN_MIN,
    percentiles: Sequence[float] = PERCENTILES,
    kurtosis: KurtosisConvention | str = KurtosisConvention.EXCESS,
) -> MapFeatures:
    """First-order features of each map (``adc``, ``dapp``, ``kapp``) over the ROI voxels.

    ``valid`` optionally restricts each map to voxels where it was estimated (e.g. ADC with a
    positive signal); DKI voxels flagged BACKGROUND (not fitted) are excluded, other flagged
    voxels are kept and counted. Fixed bin size from ``bin_min`` (default 0) with
    ``bin_widths`` per map.
    """
    roi = np.asarray(roi, dtype=bool)
    fitted = np.ones_like(roi)
    if flags is not None:
        fitted = (flags & np.uint8(FitFlag.BACKGROUND)) == 0
    features: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name in MAPS:
        if name not in maps:
            raise ValueError(f"map {name!r} missing (need {MAPS})")
        arr = np.asarray(maps[name])
        if arr.shape != roi.shape:
            raise ValueError(f"map {name!r} shape {arr.shape} differs from ROI {roi.shape}")
        sel = roi & np.isfinite(arr)
        if name in ("dapp", "kapp"):
            sel &= fitted
        if valid is not None and name in valid:
            sel &= np.asarray(valid[name], dtype=bool)
        fo = first_order(
            arr[sel],
            percentiles=percentiles,
            kurtosis=kurtosis,
            bin_width=bin_widths[name],
            bin_min=bin_min,
        )
        counts[name] = int(fo["n"])
        for stat in ("mean", "median", *(_percentile_key(q) for q in percentiles)):
            features[feature_key(name, stat)] = float(fo[stat])
        for stat in ("skewness", "kurtosis", "entropy"):
            features[feature_key(name, stat)] = float(fo[stat])
    flag_counts: dict[str, int] = {}
    if flags is not None:
        for flag in (FitFlag.AT_BOUND, FitFlag.DK_BMAX, FitFlag.LOW_SIGNAL, FitFlag.BACKGROUND):
            flag_counts[str(flag.name).lower()] = int(((flags & np.uint8(flag)) != 0)[roi].sum())
    n_roi = int(roi.sum())
    return MapFeatures(
        features=features,
        roi_voxels=n_roi,
        roi_volume_ml=n_roi * voxel_volume_mm3 / 1000.0,
        voxel_counts=counts,
        flag_counts=flag_counts,
        settings={
            "bin_width": {k: float(bin_widths[k]) for k in MAPS},
            "bin_min": float(bin_min),
            "percentiles": [float(q) for q in percentiles],
            "percentile_rule": PercentileRule.LINEAR.value,
            "kurtosis": KurtosisConvention(kurtosis).value,
            "entropy_base": 2,
        },
    )
