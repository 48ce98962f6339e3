"""The quantitative pipeline for one DWI series: ROI, DKI and ADC fits, histogram features, QC.

The output carries the 21 features and a typed :class:`models.contract.Provenance` — the results
API's own class (docs/results-api.md): the fit method, b subsets, bounds and discretisation change
the numbers by as much as the HER2 groups differ (dki-and-features notes), so they travel with
every result. Defaults come from the contract (``DEFAULT_FIT``: MP-PCA, then ``nls_rician``);
where they cannot run on a series (no noise σ, too few slices for the MP-PCA patch) the analysis
falls back to ``FALLBACK_FIT`` (``nls``, no denoising) and says so in ``provenance.fit`` and the QC
problems. PNG previews are drawn by ``previews``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import pydicom
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.analysis.adc import AdcFit, fit_adc
from dicom_node.analysis.companions import CompanionSeries, OnDwiGrid, on_dwi_grid
from dicom_node.analysis.denoise import mppca_region
from dicom_node.analysis.dki import (
    Bounds,
    DkiFit,
    DkiMethod,
    DkiModel,
    FitFlag,
)
from dicom_node.analysis.features import FEATURE_NAMES, MapFeatures, map_features
from dicom_node.analysis.noise import NoiseEstimate, NoiseMethod, background_mask, estimate_noise
from dicom_node.analysis.previews import analysis_previews
from dicom_node.analysis.qc import fit_residual, snr_at_highest_b
from dicom_node.analysis.roi import Roi, auto_roi, roi_from_seg, seg_matches
from dicom_node.series.volume import DwiVolume
from models.contract import (
    BIN_MIN,
    BIN_WIDTH,
    DEFAULT_FIT,
    FALLBACK_FIT,
    PIPELINE_VERSION,
    Discretisation,
    FitBounds,
    FitSettings,
    Laterality,
    Map,
    NoiseProvenance,
    Provenance,
    QcFlags,
    QcReport,
    StatisticConventions,
)

__all__ = [
    "PIPELINE_VERSION",
    "Analysis",
    "AnalysisError",
    "AnalysisSettings",
    "FitRegion",
    "analyse",
    "analysis_settings",
]

_FIT = DEFAULT_FIT  # the contract's analysis default, in the fit's own types
_DEFAULT_METHOD = DkiMethod(_FIT.method)
_DEFAULT_BOUNDS = Bounds(dapp=_FIT.bounds.dapp, kapp=_FIT.bounds.kapp)


class AnalysisError(ValueError):
    """The series cannot be analysed (too few b-values, no usable ROI, …); message says why."""


_DENOISERS = frozenset({"none", "mppca"})


class FitRegion(StrEnum):
    """Where the DKI fit runs: the ROI plus a margin (fast), or every non-background voxel."""

    ROI_MARGIN = "roi_margin"
    NON_BACKGROUND = "non_background"


@dataclass(frozen=True)
class AnalysisSettings:
    """Fixed per model version (the HER2 signal is as small as the effect of these choices)."""

    method: DkiMethod = _DEFAULT_METHOD
    dki_bmin: float = _FIT.dki_bmin
    #: ADC b subset in s/mm²; ``None`` = lowest of b 0/50 present, and 800 (EUSOBI).
    adc_b_values: tuple[float, ...] | None = None
    bounds: Bounds = _DEFAULT_BOUNDS
    bin_width_adc: float = BIN_WIDTH[Map.ADC]
    bin_width_dapp: float = BIN_WIDTH[Map.DAPP]
    bin_width_kapp: float = BIN_WIDTH[Map.KAPP]
    bin_min: float = BIN_MIN
    #: SEG segment to use (number or label); ``None`` = the first segment.
    segment: int | str | None = None
    fit_region: FitRegion = FitRegion.ROI_MARGIN
    roi_margin_voxels: int = 3
    sigma: float | None = None
    previews: bool = True
    #: Denoising of the fit region before the DKI fit: "none" or "mppca" (recorded in
    #: ``provenance.fit.denoise``; a model must have been trained with the same choice).
    denoise: str = _FIT.denoise
    #: When ``nls_rician`` has no σ or MP-PCA no room for its patch, fit with ``FALLBACK_FIT``
    #: instead (recorded, with the reason); False raises :class:`AnalysisError` instead.
    fallback: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", DkiMethod(self.method))
        if self.denoise not in _DENOISERS:
            raise ValueError(f"denoise must be one of {sorted(_DENOISERS)}, got {self.denoise!r}")
        object.__setattr__(self, "fit_region", FitRegion(self.fit_region))
        for name in ("bin_width_adc", "bin_width_dapp", "bin_width_kapp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.roi_margin_voxels < 0:
            raise ValueError("roi_margin_voxels must be ≥ 0")

    @property
    def bin_widths(self) -> dict[str, float]:
        return {"adc": self.bin_width_adc, "dapp": self.bin_width_dapp, "kapp": self.bin_width_kapp}

    @property
    def fit_settings(self) -> FitSettings:
        """``provenance.fit`` of results computed with these settings."""
        return FitSettings(
            method=self.method.value,
            dki_bmin=float(self.dki_bmin),
            denoise=self.denoise,
            bounds=FitBounds(
                dapp=(float(self.bounds.dapp[0]), float(self.bounds.dapp[1])),
                kapp=(float(self.bounds.kapp[0]), float(self.bounds.kapp[1])),
            ),
        )

    @property
    def discretisation(self) -> Discretisation:
        """``provenance.discretisation`` of results computed with these settings."""
        return Discretisation(
            bin_width={Map(k): float(v) for k, v in self.bin_widths.items()},
            bin_min=float(self.bin_min),
        )


def analysis_settings(method: str | None = None, denoise: str | None = None) -> AnalysisSettings:
    """Settings from an operator's choice (settings, CLI); None or "" keeps the default's value.

    The one reading of "not chosen" for the worker and ``her2low fit``, so neither spells out a
    copy of the default (which lives in ``models.contract.DEFAULT_FIT``).
    """
    settings = AnalysisSettings()
    if method:
        settings = replace(settings, method=DkiMethod(method))
    if denoise:
        settings = replace(settings, denoise=denoise)
    return settings


@dataclass
class Analysis:
    """Everything the node publishes and shows for one DWI series."""

    features: dict[str, float]
    provenance: Provenance
    laterality: Laterality | None
    roi: Roi
    maps: dict[str, NDArray[np.float64]]
    previews: dict[str, bytes]
    fit: DkiFit
    adc: AdcFit
    map_features: MapFeatures
    settings: AnalysisSettings
    sigma: float | None
    pipeline_version: str = PIPELINE_VERSION
    problems: list[str] = field(default_factory=list)
    noise: NoiseEstimate | None = None
    #: Why the requested fit was replaced by ``FALLBACK_FIT`` (``settings`` is what ran); None
    #: when it ran as requested.
    fit_fallback: str | None = None


def _pick_seg(
    segs: Sequence[pydicom.Dataset], dwi: DwiVolume, problems: list[str]
) -> pydicom.Dataset | None:
    """First SEG in the DWI's frame of reference, preferring one that references this series."""
    usable = []
    for ds in segs:
        if getattr(ds, "Modality", None) != "SEG":
            problems.append(f"object {getattr(ds, 'SOPInstanceUID', '?')} is not a SEG: ignored")
        elif not seg_matches(ds, dwi.geometry):
            problems.append(
                f"SEG {getattr(ds, 'SeriesInstanceUID', '?')} is in another frame of reference:"
                " ignored"
            )
        else:
            usable.append(ds)
    for ds in usable:
        refs = getattr(ds, "ReferencedSeriesSequence", [])
        if any(str(r.SeriesInstanceUID) == dwi.series_instance_uid for r in refs):
            return ds
    return usable[0] if usable else None


def analyse(
    dwi: DwiVolume,
    *,
    segs: Sequence[pydicom.Dataset] = (),
    settings: AnalysisSettings | None = None,
    companions: Sequence[CompanionSeries] = (),
    companions_ignored: Sequence[str] = (),
) -> Analysis:
    """Run the quantitative pipeline on one trace-weighted DWI series.

    ``companions`` (the study's T2w and DCE subtraction, ``analysis.companions``) inform the
    automatic candidate only, when they share the DWI's frame of reference and are registered;
    ``companions_ignored`` names study series the caller could not read (recorded with the ROI).

    ROI from the first usable SEG (same frame of reference), else an automatic unconfirmed
    candidate; DKI fit over the ROI plus a margin (or every non-background voxel); ADC on the
    declared b subset; IBSI first-order features of ADC, Dapp and Kapp inside the ROI; QC flag
    counts; PNG previews. Raises :class:`AnalysisError` when the series cannot give features.
    """
    requested = settings or AnalysisSettings()
    s = requested
    problems: list[str] = []
    data = dwi.data
    try:
        model = DkiModel(dwi.bvals, method=s.method, dki_bmin=s.dki_bmin, bounds=s.bounds)
        adc_fit = fit_adc(data, dwi.bvals, adc_bvals=s.adc_b_values)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from exc
    noise = (
        NoiseEstimate(s.sigma, NoiseMethod.GIVEN)
        if s.sigma is not None
        else estimate_noise(data, bvals=dwi.bvals)
    )
    sigma = None if noise is None else noise.sigma
    reasons: list[str] = []
    if noise is None:
        problems.append("noise sigma could not be estimated (no air background, no repeats)")
        if s.method is DkiMethod.NLS_RICIAN:
            reasons.append("nls_rician needs the noise sigma, which could not be estimated")
    # Multi-coil (non-central χ) noise: nls_rician fits the χ noise floor with this N.
    coils = 1.0 if noise is None else max(1.0, float(noise.effective_coils))
    if s.denoise == "mppca" and min(data.shape[:3]) < _MPPCA_MIN_AXIS:
        reasons.append(f"MP-PCA needs at least {_MPPCA_MIN_AXIS} voxels on every axis")
    if reasons:  # the requested fit cannot run on this series: the recorded fallback instead
        s = _fall_back(requested, reasons)
        model = DkiModel(dwi.bvals, method=s.method, dki_bmin=s.dki_bmin, bounds=s.bounds)
    bg = background_mask(data, sigma, bvals=dwi.bvals, snr_threshold=model.background_snr)

    seg = _pick_seg(segs, dwi, problems)
    if seg is not None:
        try:
            roi = roi_from_seg(seg, dwi.geometry, segment=s.segment)
        except ValueError as exc:
            raise AnalysisError(f"SEG unusable: {exc}") from exc
    else:
        grid = on_dwi_grid(companions, dwi, ~bg) if companions else OnDwiGrid()
        roi = auto_roi(
            data, dwi.bvals, dwi.geometry, adc=adc_fit.adc, sigma=sigma,
            enhancement=grid.enhancement, t2w=grid.t2w,
            ignored=(*companions_ignored, *grid.ignored),
        )  # fmt: skip
        problems.append("ROI is an automatic candidate awaiting confirmation")
    if roi.voxels == 0:
        raise AnalysisError("no tumour ROI: no SEG was given and no automatic candidate found")

    if s.fit_region is FitRegion.NON_BACKGROUND:
        region = ~bg | roi.mask
    else:
        region = ndimage.binary_dilation(roi.mask, iterations=s.roi_margin_voxels) | roi.mask
        if s.roi_margin_voxels == 0:
            region = roi.mask.copy()
    fit_data: NDArray[np.floating] = data
    if s.denoise == "mppca":
        denoised = mppca_region(data, region, patch_radius=_MPPCA_RADIUS)
        if denoised is None:  # cannot happen after the size check above; kept as a guard
            raise AnalysisError("MP-PCA needs at least 5 slices: the series is too thin")
        fit_data = denoised
    fit_fallback = None
    if s is not requested:
        fit_fallback = (
            f"fitted with {s.method.value} without denoising instead of "
            f"{requested.method.value} + {requested.denoise}: " + "; ".join(reasons)
        )
        problems.append(fit_fallback)
    # σ of the original magnitudes: denoising keeps the noise floor the Rician fit models.
    dki_fit = model.fit(fit_data, mask=region, sigma=sigma, coils=coils)
    maps = {"adc": adc_fit.adc, "dapp": dki_fit.dapp, "kapp": dki_fit.kapp}
    try:
        mf = map_features(
            maps,
            roi.mask,
            voxel_volume_mm3=dwi.geometry.voxel_volume_mm3,
            valid={"adc": adc_fit.valid},
            flags=dki_fit.flags,
            bin_widths=s.bin_widths,
            bin_min=s.bin_min,
        )
    except ValueError as exc:
        raise AnalysisError(f"features could not be computed in the ROI: {exc}") from exc
    features = {name: mf.features[name] for name in FEATURE_NAMES}
    bad = [k for k, v in features.items() if not np.isfinite(v)]
    if bad:
        raise AnalysisError(f"non-finite features {bad}")

    flags = {
        k: mf.flag_counts.get(k, 0) for k in ("at_bound", "dk_bmax", "low_signal", "background")
    }
    if flags["background"]:
        problems.append(f"{flags['background']} ROI voxels are background (not fitted)")
    if flags["at_bound"] > 0.1 * roi.voxels:
        problems.append(f"{flags['at_bound']} of {roi.voxels} ROI voxels sit on a fit bound")
    if flags["dk_bmax"] > 0.1 * roi.voxels:
        problems.append(f"{flags['dk_bmax']} of {roi.voxels} ROI voxels have Dapp·Kapp·b_max ≥ 3")
    if roi.voxels < 20:
        problems.append(f"ROI has only {roi.voxels} voxels: histogram features are unstable")
    # QC metrics for the service's gate: SNR of the acquired high-b image, residual of the fit.
    high_b, snr_high_b = snr_at_highest_b(data, dwi.bvals, roi.mask, sigma)
    residual = fit_residual(fit_data, dwi.bvals, dki_fit, roi.mask, dki_bmin=s.dki_bmin)

    provenance = Provenance(
        b_values=tuple(float(v) for v in dwi.bvals),
        fit=s.fit_settings,
        adc_b_values=tuple(float(v) for v in adc_fit.b_values),
        discretisation=s.discretisation,
        statistics=StatisticConventions(),  # map_features' defaults: IBSI excess, numpy linear
        roi=roi.provenance(),
        qc=QcReport(
            flags=QcFlags(**flags),
            problems=tuple(problems),
            fraction_at_bound=round(dki_fit.fraction_at_bound(roi.mask), 6),
            high_b=high_b,
            snr_high_b=None if snr_high_b is None else round(max(snr_high_b, 0.0), 3),
            fit_residual=None if residual is None else round(residual, 6),
        ),
        noise=None
        if noise is None
        else NoiseProvenance(
            sigma=float(noise.sigma),
            method=noise.method.value,
            effective_coils=float(noise.effective_coils),
        ),
    )
    previews: dict[str, bytes] = {}
    if s.previews:
        dki_fitted = region & ~dki_fit.has_flag(FitFlag.BACKGROUND)
        previews = analysis_previews(
            maps,
            roi.mask,
            roi_confirmed=roi.confirmed,
            underlay=data[..., int(np.argmin(dwi.bvals))],
            high_b=data[..., int(np.argmax(dwi.bvals))],
            orientation=(dwi.geometry.row_dir, dwi.geometry.col_dir),
            shown={"adc": adc_fit.valid & ~bg, "dapp": dki_fitted, "kapp": dki_fitted},
            histogram_voxels={"adc": adc_fit.valid, "dapp": dki_fitted, "kapp": dki_fitted},
            bin_widths=s.bin_widths,
            bin_min=s.bin_min,
        )
    return Analysis(
        features=features,
        provenance=provenance,
        laterality=roi.laterality,
        roi=roi,
        maps=maps,
        previews=previews,
        fit=dki_fit,
        adc=adc_fit,
        map_features=mf,
        settings=s,
        sigma=sigma,
        problems=problems,
        noise=noise,
        fit_fallback=fit_fallback,
    )


_MPPCA_RADIUS = 2  # 5×5×5 patches (Veraart 2016; DIPY's default)
_MPPCA_MIN_AXIS = 2 * _MPPCA_RADIUS + 1


def _fall_back(requested: AnalysisSettings, reasons: list[str]) -> AnalysisSettings:
    """``FALLBACK_FIT`` in place of a requested fit that cannot run here (or refuse, if asked)."""
    if not requested.fallback:
        raise AnalysisError("; ".join(reasons))
    return replace(requested, method=DkiMethod(FALLBACK_FIT.method), denoise=FALLBACK_FIT.denoise)
