"""The results contract: what the node publishes and the service accepts (docs/results-api.md).

One set of typed classes used on both sides of the results API. The node builds a
:class:`ResultPayload` (``dicom_node.jobs.pipeline``); the service validates incoming JSON with the
same class (``cds_service.results``) and reads stored provenance back as :class:`Provenance`; the
model card records the :class:`TrainingSettings` its features were computed with, and the runtime
refuses to score a result whose :class:`AnalysisConventions` differ, because changing the fit or
the discretisation moves the features by as much as the HER2 groups differ.

This module is the only place where the quantitative feature names, their units and plausible
ranges, the entropy bin widths and the fit defaults are written down; ``models.schema`` and the
node import them from here.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "API_VERSION",
    "BIN_MIN",
    "BIN_WIDTH",
    "DEFAULT_CONVENTIONS",
    "DEFAULT_FIT",
    "FALLBACK_FIT",
    "LEGACY_CONVENTIONS",
    "LEGACY_FIT",
    "MAP_UNITS",
    "PERCENTILES",
    "PIPELINE_VERSION",
    "QUANTITATIVE",
    "QUANTITATIVE_NAMES",
    "AnalysisConventions",
    "BinningMethod",
    "Discretisation",
    "FeatureValidationError",
    "FitBounds",
    "FitSettings",
    "KurtosisConvention",
    "Laterality",
    "Map",
    "NoiseProvenance",
    "PatientKey",
    "PercentileRule",
    "Provenance",
    "QcFlags",
    "QcReport",
    "QuantitativeFeature",
    "ResultPayload",
    "RoiProvenance",
    "RoiSource",
    "SettingsMismatchError",
    "Statistic",
    "StatisticConventions",
    "TrainingSettings",
    "check_feature_value",
    "feature_name",
    "read_features",
]

#: Version of the results API body (``api_version``).
API_VERSION: Literal[1] = 1
#: Version of the numbers the node computes: bump when a default here or an algorithm changes them.
#: dki-1: ``nls`` without denoising; dki-2: MP-PCA + ``nls_rician`` where σ is known
#: (:data:`DEFAULT_FIT`), ``nls`` without denoising where it is not (:data:`FALLBACK_FIT`).
PIPELINE_VERSION = "dki-2"


class FeatureValidationError(ValueError):
    """An input the model cannot use; ``feature`` names the offending input."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(f"{feature}: {message}")
        self.feature = feature
        self.message = message


# --- coded values ---------------------------------------------------------------------------


class Map(StrEnum):
    """Parametric maps the histogram statistics are taken from."""

    ADC = "adc"
    DAPP = "dapp"
    KAPP = "kapp"


class Statistic(StrEnum):
    """IBSI first-order statistics over the whole-tumour ROI."""

    MEAN = "mean"
    MEDIAN = "median"
    P5 = "p5"
    P95 = "p95"
    SKEWNESS = "skewness"
    KURTOSIS = "kurtosis"
    ENTROPY = "entropy"


class Laterality(StrEnum):
    """Side of the patient, coded as Laterality (0020,0060) (PS3.3 C.7.3.1; LPS: +x is left)."""

    LEFT = "L"
    RIGHT = "R"


class RoiSource(StrEnum):
    """Where the tumour ROI came from: a DICOM SEG, or the node's automatic candidate."""

    SEG = "seg"
    AUTO = "auto"


class KurtosisConvention(StrEnum):
    """IBSI reports excess kurtosis; PyRadiomics and MATLAB report Pearson's (excess + 3)."""

    EXCESS = "excess"
    PEARSON = "pearson"


class BinningMethod(StrEnum):
    """IBSI discretisation methods."""

    FIXED_BIN_SIZE = "fixed_bin_size"
    FIXED_BIN_NUMBER = "fixed_bin_number"


class PercentileRule(StrEnum):
    """How percentiles and the median interpolate (numpy's ``method``; default ``linear``)."""

    LINEAR = "linear"


# --- the quantitative features: names, units, ranges, bin widths ----------------------------

#: Units (UCUM) the maps are stored in: diffusivities in mm²/s, Kapp unitless.
MAP_UNITS: dict[Map, str] = {Map.ADC: "mm2/s", Map.DAPP: "mm2/s", Map.KAPP: "1"}
#: Fixed-bin-width discretisation for entropy, from ``BIN_MIN`` (IBSI "fixed bin size"):
#: 0.025 x10⁻³ mm²/s for ADC and Dapp (stored in mm²/s), 0.025 for Kapp.
BIN_WIDTH: dict[Map, float] = {Map.ADC: 2.5e-5, Map.DAPP: 2.5e-5, Map.KAPP: 0.025}
BIN_MIN = 0.0
#: Percentiles published as ``p5`` and ``p95``.
PERCENTILES: tuple[float, float] = (5.0, 95.0)

#: Plausible ranges. Diffusivities: the DKI fit bounds Dapp to (0, 3.5e-3] mm2/s; free water at
#: body temperature is ~3.0e-3, so 4e-3 covers every fitted voxel. A value like 1.2 is a unit error
#: (10^-3 mm2/s entered as mm2/s) and is rejected with a hint. Kapp is bounded to [0, 3] by the fit.
#: Skewness/excess kurtosis bounds are generous: they only stop corrupt numbers. Entropy cannot
#: exceed log2 of the bin count (140 bins for 3.5e-3 / 2.5e-5), so 12 bits is a safe ceiling.
_DIFFUSIVITY_RANGE = (0.0, 4.0e-3)
_KAPP_RANGE = (0.0, 3.0)
_SKEWNESS_RANGE = (-30.0, 30.0)
_KURTOSIS_RANGE = (-2.0, 1000.0)
_ENTROPY_RANGE = (0.0, 12.0)
_LOCATION = (Statistic.MEAN, Statistic.MEDIAN, Statistic.P5, Statistic.P95)


@dataclass(frozen=True)
class QuantitativeFeature:
    """One published histogram feature: its map, statistic, unit (UCUM) and plausible range."""

    name: str
    map: Map
    statistic: Statistic
    unit: str
    display_unit: str  # how people read it, e.g. "10^-3 mm2/s"
    display_scale: float  # multiply the stored value by this for display
    range: tuple[float, float]

    @property
    def bin_width(self) -> float | None:
        """The entropy's fixed bin width (in the map's unit); None for other statistics."""
        return BIN_WIDTH[self.map] if self.statistic is Statistic.ENTROPY else None


def feature_name(map_: Map | str, statistic: Statistic | str) -> str:
    """``{map}_{statistic}``, e.g. ``dapp_p95``."""
    return f"{Map(map_).value}_{Statistic(statistic).value}"


def _quantitative(map_: Map, stat: Statistic) -> QuantitativeFeature:
    diffusivity = MAP_UNITS[map_] == "mm2/s"
    if stat in _LOCATION:
        unit = MAP_UNITS[map_]
        rng = _DIFFUSIVITY_RANGE if diffusivity else _KAPP_RANGE
        display_unit = "10^-3 mm2/s" if diffusivity else "1"
        scale = 1e3 if diffusivity else 1.0
    elif stat is Statistic.ENTROPY:
        unit, rng, display_unit, scale = "bit", _ENTROPY_RANGE, "bit", 1.0
    else:
        unit = "1"
        rng = _SKEWNESS_RANGE if stat is Statistic.SKEWNESS else _KURTOSIS_RANGE
        display_unit, scale = "1", 1.0
    return QuantitativeFeature(feature_name(map_, stat), map_, stat, unit, display_unit, scale, rng)


#: The 21 features published with every result, in publication order (map, then statistic).
QUANTITATIVE: dict[str, QuantitativeFeature] = {
    q.name: q for q in (_quantitative(m, s) for m in Map for s in Statistic)
}
QUANTITATIVE_NAMES: tuple[str, ...] = tuple(QUANTITATIVE)
_UNKNOWN = "unknown feature (see `her2low model schema`)"


def check_feature_value(name: str, value: object) -> float:
    """One quantitative value as a float (NaN = missing), or FeatureValidationError naming it.

    Numbers and numeric strings (form input) are accepted; infinities, other types and values
    outside the plausible range are not (a diffusivity given in 10⁻³ mm²/s gets a hint).
    """
    spec = QUANTITATIVE.get(name)
    if spec is None:
        raise FeatureValidationError(name, _UNKNOWN)
    if type(value) is float:
        number = value
    elif value is None:
        return math.nan
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FeatureValidationError(
            name, f"expected a number, got {type(value).__name__} {value!r}"
        )
    elif isinstance(value, str):
        text = value.strip()
        if text == "":
            return math.nan
        try:
            number = float(text)
        except ValueError:
            raise FeatureValidationError(name, f"expected a number, got {value!r}") from None
    else:
        number = float(value)
    if math.isnan(number):
        return math.nan
    if math.isinf(number):
        raise FeatureValidationError(name, "must be finite")
    lo, hi = spec.range
    if not lo <= number <= hi:
        hint = ""
        if spec.unit == "mm2/s" and number > hi and number * 1e-3 <= hi:
            hint = f" (looks like 10^-3 mm2/s: give {number * 1e-3:.3g}, not {number:g})"
        raise FeatureValidationError(
            name, f"{number:g} {spec.unit} is outside the plausible range [{lo:g}, {hi:g}]{hint}"
        )
    return number


# --- field types -----------------------------------------------------------------------------
# Scalars are strict (no "1" for 1, no 1 for True); enums and arrays take their JSON form.

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(ge=0)]
Flag = Annotated[bool, Strict()]
BValue = Annotated[int, Strict(), Field(ge=0)] | NonNegative
Uid = Annotated[str, Strict(), StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
Problem = Annotated[str, Strict(), StringConstraints(max_length=500)]


def _known_feature(name: str) -> str:
    if name not in QUANTITATIVE:
        raise ValueError(f"unknown feature {name!r} (see `her2low model schema`)")
    return name


FeatureName = Annotated[str, Strict(), AfterValidator(_known_feature)]
FeatureValue = Annotated[float, Strict()] | None


def _utc(value: Any) -> datetime:
    """ISO 8601 text (or a datetime) as an aware UTC datetime; naive means UTC.

    An offset that pushes the instant past year 1 or 9999 is refused rather than overflowing
    later in storage or FHIR rendering.
    """
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {value!r}") from None
    else:
        raise ValueError("expected an ISO 8601 date-time string")
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"date-time out of range: {value!s}") from None


UtcDateTime = Annotated[datetime, BeforeValidator(_utc)]


def _png_base64(data: str) -> str:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG image")
    return data


PreviewName = Annotated[str, Strict(), StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
PngBase64 = Annotated[str, Strict(), AfterValidator(_png_base64)]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- settings that change the numbers ---------------------------------------------------------


class FitBounds(_Contract):
    """Box constraints of the DKI fit: Dapp in mm²/s (lower bound open), Kapp unitless."""

    dapp: tuple[NonNegative, Positive] = (0.0, 3.5e-3)
    kapp: tuple[Number, Number] = (0.0, 3.0)


class FitSettings(_Contract):
    """``provenance.fit``: the DKI fit method, the lowest b in the fit and the bounds.

    The field defaults are the *legacy* meaning (pipeline dki-1: ``nls``, no denoising), which is
    what an absent ``denoise`` key in a stored result or card must keep meaning. They are not the
    analysis default: that is :data:`DEFAULT_FIT`, the one place it is written.
    """

    method: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=32)] = "nls"
    dki_bmin: NonNegative = 0.0
    bounds: FitBounds = FitBounds()
    #: Denoising of the DWI before the fit ("none" or "mppca", MP-PCA of Veraart 2016). It moves
    #: the features, so it is a convention the model must share; "none" is left out of the JSON
    #: so results and cards from before the field compare (and hash) as they did.
    denoise: Annotated[str, Strict(), StringConstraints(pattern=r"^[a-z0-9_\-]{1,32}$")] = Field(
        default="none", exclude_if=lambda v: v == "none"
    )


#: What results and cards from before dki-2 mean (``nls``, no denoising); a card without
#: ``fit_settings`` means these. Fixed forever: never tie it to the current default.
LEGACY_FIT = FitSettings(method="nls", denoise="none")
#: The node's analysis where the noise σ is known (issue 12): MP-PCA denoising of the fit region
#: (Veraart 2016), then the Rician-aware NLS fit with the σ of the original magnitudes.
DEFAULT_FIT = FitSettings(method="nls_rician", denoise="mppca")
#: What the node falls back to when the default cannot run on a series (no σ for ``nls_rician``,
#: too few slices for MP-PCA's patch): recorded as such in ``provenance.fit``, with the reason in
#: ``provenance.qc.problems``. A model trained on :data:`DEFAULT_FIT` does not score it.
FALLBACK_FIT = FitSettings(method="nls", denoise="none")


class Discretisation(_Contract):
    """``provenance.discretisation``: how entropy's histogram was binned (IBSI section 2.7)."""

    method: BinningMethod = BinningMethod.FIXED_BIN_SIZE
    bin_width: dict[Map, Positive] = Field(default_factory=lambda: dict(BIN_WIDTH))
    bin_min: Number = BIN_MIN

    @model_validator(mode="after")
    def _every_map(self) -> Self:
        missing = [m.value for m in Map if m not in self.bin_width]
        if missing:
            raise ValueError(f"bin_width missing for {', '.join(missing)}")
        return self


class StatisticConventions(_Contract):
    """``provenance.statistics``: the kurtosis convention, percentile rule and entropy base."""

    kurtosis: KurtosisConvention = KurtosisConvention.EXCESS
    percentile_rule: PercentileRule = PercentileRule.LINEAR
    entropy_base: Literal[2] = 2


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


class AnalysisConventions(_Contract):
    """Everything a result's features and a model's training features must share."""

    fit: FitSettings = DEFAULT_FIT
    discretisation: Discretisation = Discretisation()
    statistics: StatisticConventions = StatisticConventions()

    def differences(self, result: AnalysisConventions) -> list[str]:
        """Settings where ``result`` differs from these (the model's), one line each."""
        mine = _flatten(self.model_dump(mode="json"))
        theirs = _flatten(result.model_dump(mode="json"))
        return [
            f"{path}: result {theirs.get(path)!r}, model {mine.get(path)!r}"
            for path in sorted(set(mine) | set(theirs))
            if mine.get(path) != theirs.get(path)
        ]


DEFAULT_CONVENTIONS = AnalysisConventions()
#: The conventions of results and cards from before dki-2 (see :data:`LEGACY_FIT`).
LEGACY_CONVENTIONS = AnalysisConventions(fit=LEGACY_FIT)


class SettingsMismatchError(ValueError):
    """A result computed with other fit/discretisation settings than the model was trained on."""

    def __init__(self, differences: Sequence[str]) -> None:
        self.differences = tuple(differences)
        super().__init__(
            "computed with other fit or discretisation settings than the model's: "
            + "; ".join(self.differences)
        )


# The card's ``fit_settings`` keeps its original, human-readable spelling of two conventions.
_CARD_KURTOSIS = {KurtosisConvention.EXCESS: "excess (IBSI)", KurtosisConvention.PEARSON: "pearson"}
_CARD_PERCENTILE = {PercentileRule.LINEAR: "numpy linear"}


def _from_card_text(enum: type[StrEnum], table: Mapping[Any, str], text: object) -> Any:
    for member, spelled in table.items():
        if text == spelled:
            return member
    return enum(str(text))


class TrainingSettings(_Contract):
    """The card's ``fit_settings``: the conventions of the training features, and the b-values.

    The acquisition b-values are recorded (a site protocol differing from them is worth knowing)
    but only :attr:`conventions` decides whether a result may be scored.
    """

    conventions: AnalysisConventions = DEFAULT_CONVENTIONS
    b_values: tuple[BValue, ...] = (0, 50, 800, 1000, 1500, 2000)
    adc_b_values: tuple[BValue, ...] = (0, 800)

    def to_card(self) -> dict[str, Any]:
        """The card and ``her2low model schema`` form (unchanged since card_version 1)."""
        c = self.conventions
        discretisation: dict[str, Any] = {
            "bin_width": {m.value: w for m, w in c.discretisation.bin_width.items()},
            "bin_min": c.discretisation.bin_min,
        }
        if c.discretisation.method is not BinningMethod.FIXED_BIN_SIZE:
            discretisation["method"] = c.discretisation.method.value
        card: dict[str, Any] = {
            "method": c.fit.method,
            "dki_bmin": c.fit.dki_bmin,
            "b_values": list(self.b_values),
            "b_value_unit": "s/mm2",
            "adc_b_values": list(self.adc_b_values),
            "bounds": {"dapp": list(c.fit.bounds.dapp), "kapp": list(c.fit.bounds.kapp)},
            **({"denoise": c.fit.denoise} if c.fit.denoise != "none" else {}),
            "kurtosis": _CARD_KURTOSIS[c.statistics.kurtosis],
            "percentile_rule": _CARD_PERCENTILE[c.statistics.percentile_rule],
            "discretisation": discretisation,
        }
        return card

    @classmethod
    def from_card(cls, data: Mapping[str, Any] | None) -> TrainingSettings:
        """Parse a card's ``fit_settings``; absent keys keep their legacy (dki-1) meaning.

        A card without ``fit_settings`` predates it and was trained with ``nls`` and no
        denoising (:data:`LEGACY_CONVENTIONS`), whatever today's default is.
        """
        if not data:
            return cls(conventions=LEGACY_CONVENTIONS)
        disc = data.get("discretisation") or {}
        bounds = data.get("bounds") or {}
        conventions = AnalysisConventions(
            fit=FitSettings(
                method=str(data.get("method", LEGACY_FIT.method)),
                dki_bmin=float(data.get("dki_bmin", LEGACY_FIT.dki_bmin)),
                denoise=str(data.get("denoise", LEGACY_FIT.denoise)),
                bounds=FitBounds.model_validate(
                    {k: tuple(float(x) for x in v) for k, v in bounds.items()}
                ),
            ),
            discretisation=Discretisation.model_validate(
                {
                    "method": disc.get("method", BinningMethod.FIXED_BIN_SIZE.value),
                    "bin_width": {k: float(v) for k, v in (disc.get("bin_width") or {}).items()}
                    or dict(BIN_WIDTH),
                    "bin_min": float(disc.get("bin_min", BIN_MIN)),
                }
            ),
            statistics=StatisticConventions(
                kurtosis=_from_card_text(
                    KurtosisConvention, _CARD_KURTOSIS, data.get("kurtosis", "excess")
                ),
                percentile_rule=_from_card_text(
                    PercentileRule, _CARD_PERCENTILE, data.get("percentile_rule", "linear")
                ),
            ),
        )
        return cls(
            conventions=conventions,
            b_values=tuple(data.get("b_values", cls().b_values)),
            adc_b_values=tuple(data.get("adc_b_values", cls().adc_b_values)),
        )


# --- the payload -----------------------------------------------------------------------------


class PatientKey(_Contract):
    """DICOM PatientID (0010,0020) and IssuerOfPatientID (0010,0021); PatientName (0010,0010).

    ``name`` is the PN value as a string (``Family^Given``), optional (nodes before it omit it):
    the review app shows it to signed-in users; matching never uses it (identity is the ID).
    """

    id: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    issuer: Annotated[str, Strict(), StringConstraints(max_length=64)] = ""
    name: Annotated[str, Strict(), StringConstraints(max_length=324)] | None = None


class RoiProvenance(_Contract):
    """``provenance.roi``: the tumour ROI the features were measured in."""

    source: RoiSource
    confirmed: Flag
    voxels: Count
    volume_ml: NonNegative | None = None
    seg_series_uid: Uid | None = None
    #: Automatic candidate: the images it used (``dwi_high_b``, ``adc``, ``t2w``,
    #: ``dce_subtraction``) and the study's other series left out, each with why; both absent
    #: when the study offered nothing but the DWI (optional: older nodes omit them).
    inputs: tuple[Problem, ...] | None = Field(default=None, exclude_if=lambda v: v is None)
    inputs_ignored: tuple[Problem, ...] | None = Field(default=None, exclude_if=lambda v: v is None)


class QcFlags(_Contract):
    """DKI fit flags counted inside the ROI (``dicom_node.analysis.dki.FitFlag``)."""

    at_bound: Count = 0
    dk_bmax: Count = 0
    low_signal: Count = 0
    background: Count = 0

    def raised(self) -> dict[str, int]:
        """The flags that occurred, in declaration order."""
        return {k: v for k, v in self.model_dump().items() if v}


class QcReport(_Contract):
    """``provenance.qc``: flag counts and the problems found (plain text, no patient data)."""

    flags: QcFlags = QcFlags()
    problems: tuple[Problem, ...] = ()
    #: Share of the fitted ROI voxels with Dapp or Kapp on a bound (optional: older nodes omit it).
    fraction_at_bound: Fraction | None = Field(default=None, exclude_if=lambda v: v is None)
    #: Highest b-value of the series (s/mm²) and the ROI's mean signal there over the noise σ:
    #: the DKI curvature is read from this image, so an SNR near the noise floor biases Kapp.
    high_b: NonNegative | None = Field(default=None, exclude_if=lambda v: v is None)
    snr_high_b: NonNegative | None = Field(default=None, exclude_if=lambda v: v is None)
    #: Median over the fitted ROI voxels of the RMS fit residual over the fitted S0 (a fraction):
    #: large when the signal does not follow the DKI model (motion, misregistration, artefact).
    fit_residual: NonNegative | None = Field(default=None, exclude_if=lambda v: v is None)


class NoiseProvenance(_Contract):
    """``provenance.noise``: the noise σ the fit used, where it came from, and the coil count.

    ``method``: given, background (Rayleigh, N = 1), background_chi (central χ, N > 1) or
    repeats; ``effective_coils`` is N of the non-central-χ model (1 = Rician).
    """

    sigma: Positive
    method: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=32)]
    effective_coils: Positive = 1.0


class ScannerInfo(_Contract):
    """``provenance.scanner``: Manufacturer (0008,0070) and ManufacturerModelName (0008,1090)
    of the series, so a site can watch feature drift per scanner (optional)."""

    manufacturer: Annotated[str, Strict(), StringConstraints(max_length=64)] = ""
    model: Annotated[str, Strict(), StringConstraints(max_length=64)] = ""
    #: MagneticFieldStrength (0018,0087) in tesla (optional; checked against the model card).
    field_strength_t: Positive | None = Field(default=None, exclude_if=lambda v: v is None)
    #: SoftwareVersions (0018,1020), its values joined by ``\``: a scanner upgrade can change
    #: the diffusion reconstruction, so a site can tell a drift after one (optional).
    software_versions: Annotated[str, Strict(), StringConstraints(max_length=128)] = Field(
        default="", exclude_if=lambda v: not v
    )

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.manufacturer, self.model) if p) or "scanner not stated"

    @property
    def description(self) -> str:
        """Make and model, field strength and software, as a case page shows them."""
        parts = [self.label]
        if self.field_strength_t is not None:
            parts.append(f"{self.field_strength_t:g} T")
        if self.software_versions:
            parts.append(f"software {self.software_versions}")
        return ", ".join(parts)


#: Settings a published result must state (the classes' defaults are never assumed for it).
_STATED: dict[str, tuple[str, ...]] = {
    "fit": ("method", "dki_bmin", "bounds"),
    "fit.bounds": ("dapp", "kapp"),
    "discretisation": ("bin_width", "bin_min"),
    "statistics": ("kurtosis", "percentile_rule"),
}


class Provenance(_Contract):
    """``provenance``: how the features were computed and from which ROI."""

    b_values: tuple[BValue, ...] = Field(min_length=1)
    fit: FitSettings
    adc_b_values: tuple[BValue, ...]
    discretisation: Discretisation
    statistics: StatisticConventions
    roi: RoiProvenance
    qc: QcReport
    scanner: ScannerInfo | None = Field(default=None, exclude_if=lambda v: v is None)
    noise: NoiseProvenance | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _settings_stated(cls, data: Any) -> Any:
        """JSON input must spell out every setting; a missing one is not read as the default."""
        if not isinstance(data, Mapping):
            return data
        for section, keys in _STATED.items():
            given: Any = data
            for part in section.split("."):
                given = given.get(part) if isinstance(given, Mapping) else None
            if isinstance(given, Mapping):
                for key in keys:
                    if key not in given:
                        raise ValueError(f"{section}.{key}: required (settings are never assumed)")
        return data

    @property
    def conventions(self) -> AnalysisConventions:
        return AnalysisConventions(
            fit=self.fit, discretisation=self.discretisation, statistics=self.statistics
        )

    @classmethod
    def stored(cls, data: object) -> Provenance | None:
        """Stored provenance read back; None for a row that predates the contract."""
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected the number 1")
    return value


_FEATURES: TypeAdapter[dict[str, float | None]] = TypeAdapter(dict[FeatureName, FeatureValue])


class ResultPayload(_Contract):
    """``POST /api/v1/results``: one analysed diffusion series."""

    api_version: Annotated[Literal[1], BeforeValidator(_not_bool)]
    pipeline_version: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    study_instance_uid: Uid
    series_instance_uid: Uid
    accession_number: Annotated[str, Strict(), StringConstraints(max_length=64)] | None = None
    patient: PatientKey
    acquired_at: UtcDateTime
    #: StudyDate (0008,0020), optional (nodes before it omit it): the worklist's study date.
    study_date: date | None = None
    laterality: Laterality | None = None
    features: dict[FeatureName, FeatureValue]
    provenance: Provenance
    previews: dict[PreviewName, PngBase64] | None = None

    @field_validator("features")
    @classmethod
    def _plausible(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for name, number in value.items():
            try:
                check_feature_value(name, number)
            except FeatureValidationError as exc:
                raise ValueError(f"features.{exc}") from None
        return value

    def to_json(self) -> dict[str, Any]:
        """The wire (and storage) form.

        The optional identity fields added later (``patient.name``, ``study_date``) are left out
        when absent, so a payload of an older node hashes as it did (re-publish: unchanged).
        """
        body = self.model_dump(mode="json")
        if body.get("study_date") is None:
            body.pop("study_date", None)
        if body["patient"].get("name") is None:
            body["patient"].pop("name", None)
        return body


def read_features(data: object) -> dict[str, float | None]:
    """Stored features read back: known names only, non-finite as None."""
    if not isinstance(data, Mapping):
        return {}
    known = {k: v for k, v in data.items() if k in QUANTITATIVE}
    try:
        checked = _FEATURES.validate_python(known)
    except ValidationError:
        return {}
    return {k: v if v is not None and math.isfinite(v) else None for k, v in checked.items()}


# --- Results back to the PACS: what the node and the service tell each other about them ---


class ExportState(StrEnum):
    """One batch of result objects for one destination: pending → sending → done, or dead."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


ShortText = Annotated[str, Strict(), StringConstraints(max_length=500)]


class ExportStatus(_Contract):
    """Where one destination's copy of an analysis's DICOM objects stands."""

    destination: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    state: ExportState
    attempts: Annotated[int, Strict(), Field(ge=0)]
    #: How many DICOM objects the batch holds (SR, SEG, maps, ...).
    objects: Annotated[int, Strict(), Field(ge=0)]
    #: The last failure in words (status, refusal, timeout), without patient data; "" when none.
    last_error: ShortText = ""
    updated_at: UtcDateTime
    sent_at: UtcDateTime | None = None


class ExportReport(_Contract):
    """``PUT /api/v1/exports``: the node's export states for one analysed series."""

    api_version: Annotated[Literal[1], BeforeValidator(_not_bool)]
    series_instance_uid: Uid
    pipeline_version: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    exports: tuple[ExportStatus, ...] = Field(max_length=32)


class Assessment(_Contract):
    """``GET /api/v1/assessments``: what the service concluded for one analysed series.

    The node writes it into a revised Measurement Report for the PACS: the radiologist's
    descriptors as entered, and the likelihood with the model that produced it.
    """

    result_id: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    series_instance_uid: Uid
    pipeline_version: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]
    revision: Annotated[int, Strict(), Field(ge=1)]
    #: Descriptor name → coded value, as validated by ``models.feature_schema``; empty if none.
    descriptors: dict[str, Annotated[str, Strict(), StringConstraints(max_length=64)]]
    descriptors_version: Annotated[int, Strict(), Field(ge=1)] | None = None
    #: None when not scored (QC, settings mismatch, descriptors missing): ``not_scored`` says why.
    probability: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] | None = None
    model_name: Annotated[str, Strict(), StringConstraints(max_length=128)] | None = None
    model_version: Annotated[str, Strict(), StringConstraints(max_length=64)] | None = None
    clinically_validated: bool = False
    #: The model's own statement, e.g. "Reference model, not clinically validated".
    statement: ShortText = ""
    not_scored: tuple[ShortText, ...] = ()
    computed_at: UtcDateTime


class AssessmentPage(_Contract):
    """Assessments computed after ``since`` (exclusive), oldest first; poll again from ``until``."""

    assessments: tuple[Assessment, ...]
    until: UtcDateTime
