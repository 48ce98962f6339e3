"""The one definition of the model's inputs.

Training, the ONNX graph, the results API, the review form and the FHIR components all derive
their feature names, controlled values, units (UCUM), plausible ranges and form labels from here,
so a value accepted in one place is accepted everywhere. ``validate_inputs`` is the single gate
every entry point uses; it raises :class:`FeatureValidationError` naming the feature.

The quantitative features (names, units, ranges, bin widths) and the fit settings come from
``models.contract``, the results contract shared with the node; this module adds the radiologist's
descriptors and the labels people read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from models.contract import (
    BIN_MIN,
    BIN_WIDTH,
    MAP_UNITS,
    FeatureValidationError,
    Map,
    QuantitativeFeature,
    Statistic,
    TrainingSettings,
    check_feature_value,
)
from models.contract import QUANTITATIVE as _CONTRACT_FEATURES

__all__ = ["BIN_WIDTH", "FeatureValidationError", "Map", "Statistic"]

SCHEMA_VERSION = "1"

#: What a validated input looks like: descriptors as strings ("" = not entered / does not apply),
#: numbers as floats (NaN = missing). Never ``None`` after validation.
InputValue = str | float


class FeatureKind(StrEnum):
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"


class Her2Group(StrEnum):
    """Pathology HER2 group (IHC/ISH) used as the training target."""

    ZERO = "zero"
    LOW = "low"
    OVER = "over"


class LesionType(StrEnum):
    MASS = "mass"
    NME = "nme"


class MassShape(StrEnum):
    OVAL = "oval"
    ROUND = "round"
    IRREGULAR = "irregular"


class MassMargin(StrEnum):
    CIRCUMSCRIBED = "circumscribed"
    IRREGULAR = "irregular"
    SPICULATED = "spiculated"


class MassInternalEnhancement(StrEnum):
    HOMOGENEOUS = "homogeneous"
    HETEROGENEOUS = "heterogeneous"
    RIM = "rim"
    DARK_INTERNAL_SEPTATIONS = "dark_internal_septations"


class NmeDistribution(StrEnum):
    FOCAL = "focal"
    LINEAR = "linear"
    SEGMENTAL = "segmental"
    REGIONAL = "regional"
    MULTIPLE_REGIONS = "multiple_regions"
    DIFFUSE = "diffuse"


class NmeInternalPattern(StrEnum):
    HOMOGENEOUS = "homogeneous"
    HETEROGENEOUS = "heterogeneous"
    CLUMPED = "clumped"
    CLUSTERED_RING = "clustered_ring"


class YesNo(StrEnum):
    YES = "yes"
    NO = "no"


class KineticCurve(StrEnum):
    PERSISTENT = "persistent"
    PLATEAU = "plateau"
    WASHOUT = "washout"


ALL_LESION_TYPES: tuple[LesionType, ...] = (LesionType.MASS, LesionType.NME)


@dataclass(frozen=True)
class FeatureSpec:
    """One model input: its coding, unit, plausible range and where it applies."""

    name: str
    kind: FeatureKind
    label: str
    description: str
    values: tuple[str, ...] = ()  # controlled values (categorical)
    value_labels: tuple[str, ...] = ()  # human labels, same order as ``values``
    unit: str | None = None  # UCUM (numeric)
    display_unit: str | None = None  # how people read it, e.g. "10^-3 mm2/s"
    display_scale: float = 1.0  # multiply the stored value by this for display
    range: tuple[float, float] | None = None  # plausible closed interval (numeric)
    applies_to: tuple[LesionType, ...] = ALL_LESION_TYPES
    group: str = "descriptor"  # "descriptor" | "quantitative"
    optional: bool = False  # a descriptor a form may leave out without it counting as missing
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_categorical(self) -> bool:
        return self.kind is FeatureKind.CATEGORICAL

    def to_dict(self) -> dict[str, Any]:
        """The public listing entry (``her2low model schema --json``)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "group": self.group,
            "label": self.label,
            "description": self.description,
            "applies_to": [t.value for t in self.applies_to],
        }
        if self.is_categorical:
            entry["values"] = list(self.values)
            entry["value_labels"] = dict(zip(self.values, self.value_labels, strict=True))
            entry["unit"] = None
            entry["optional"] = self.optional
        else:
            entry["unit"] = self.unit
            entry["range"] = list(self.range) if self.range else None
            entry["display_unit"] = self.display_unit
            entry["display_scale"] = self.display_scale
        entry.update(self.extra)
        return entry


def _labels(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(str(m.value).replace("_", " ").capitalize() for m in enum)


def _categorical(
    name: str,
    enum: type[Enum],
    label: str,
    description: str,
    applies_to: tuple[LesionType, ...] = ALL_LESION_TYPES,
    optional: bool = False,
) -> FeatureSpec:
    return FeatureSpec(
        name=name,
        kind=FeatureKind.CATEGORICAL,
        label=label,
        description=description,
        values=tuple(str(m.value) for m in enum),
        value_labels=_labels(enum),
        applies_to=applies_to,
        group="descriptor",
        optional=optional,
    )


_MASS = (LesionType.MASS,)
_NME = (LesionType.NME,)

DESCRIPTORS: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        name="lesion_type",
        kind=FeatureKind.CATEGORICAL,
        label="Lesion type",
        description="BI-RADS MRI lesion type: mass or non-mass enhancement (NME).",
        values=("mass", "nme"),
        value_labels=("Mass", "Non-mass enhancement"),
    ),
    _categorical("mass_shape", MassShape, "Mass shape", "BI-RADS mass shape.", _MASS),
    _categorical("mass_margin", MassMargin, "Mass margin", "BI-RADS mass margin.", _MASS),
    _categorical(
        "mass_internal_enhancement",
        MassInternalEnhancement,
        "Mass internal enhancement",
        "BI-RADS internal enhancement characteristics of a mass.",
        _MASS,
    ),
    _categorical(
        "nme_distribution", NmeDistribution, "NME distribution", "BI-RADS NME distribution.", _NME
    ),
    _categorical(
        "nme_internal_pattern",
        NmeInternalPattern,
        "NME internal enhancement pattern",
        "BI-RADS internal enhancement pattern of NME.",
        _NME,
    ),
    _categorical(
        "t2_hyperintensity",
        YesNo,
        "Intratumoral T2 hyperintensity",
        "Intratumoral high signal on T2-weighted images.",
    ),
    _categorical(
        "peritumoral_edema",
        YesNo,
        "Peritumoral edema",
        "Peritumoral high signal on T2-weighted images.",
    ),
    _categorical(
        "kinetic_curve",
        KineticCurve,
        "Kinetic curve (delayed phase)",
        "Time-intensity curve type of the delayed phase; optional.",
        optional=True,
    ),
)

_MAP_LABELS = {Map.ADC: "ADC", Map.DAPP: "Dapp", Map.KAPP: "Kapp"}
_STAT_LABELS = {
    Statistic.MEAN: "mean",
    Statistic.MEDIAN: "median",
    Statistic.P5: "5th percentile",
    Statistic.P95: "95th percentile",
    Statistic.SKEWNESS: "skewness",
    Statistic.KURTOSIS: "excess kurtosis (IBSI)",
    Statistic.ENTROPY: "entropy",
}


def _quantitative(q: QuantitativeFeature) -> FeatureSpec:
    extra: dict[str, Any] = {"map": q.map.value, "statistic": q.statistic.value}
    if q.bin_width is not None:
        extra["discretisation"] = {
            "bin_width": q.bin_width,
            "bin_min": BIN_MIN,
            "bin_width_unit": MAP_UNITS[q.map],
        }
    map_label, stat_label = _MAP_LABELS[q.map], _STAT_LABELS[q.statistic]
    return FeatureSpec(
        name=q.name,
        kind=FeatureKind.NUMERIC,
        label=f"{map_label} {stat_label}",
        description=f"{stat_label.capitalize()} of {map_label} in the tumour ROI.",
        unit=q.unit,
        display_unit=q.display_unit,
        display_scale=q.display_scale,
        range=q.range,
        group="quantitative",
        extra=extra,
    )


QUANTITATIVE: tuple[FeatureSpec, ...] = tuple(_quantitative(q) for q in _CONTRACT_FEATURES.values())

FEATURES: dict[str, FeatureSpec] = {spec.name: spec for spec in (*DESCRIPTORS, *QUANTITATIVE)}
DESCRIPTOR_NAMES: tuple[str, ...] = tuple(s.name for s in DESCRIPTORS)
QUANTITATIVE_NAMES: tuple[str, ...] = tuple(s.name for s in QUANTITATIVE)
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)
TARGET = "her2_group"
LESION_TYPE = "lesion_type"


#: The fit and discretisation settings the quantitative inputs assume (the card records them).
FIT_SETTINGS = TrainingSettings()


def list_features() -> dict[str, Any]:
    """The public schema listing: every feature with its coding, unit, range and applicability."""
    return {
        "schema_version": SCHEMA_VERSION,
        "target": {"name": TARGET, "values": [g.value for g in Her2Group]},
        "fit_settings": FIT_SETTINGS.to_card(),
        "features": [spec.to_dict() for spec in FEATURES.values()],
    }


def feature_spec(name: str) -> FeatureSpec:
    """Look a feature up by name; unknown names raise :class:`FeatureValidationError`."""
    try:
        return FEATURES[name]
    except KeyError:
        raise FeatureValidationError(name, "unknown feature (see `her2low model schema`)") from None


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# Lookup tables built once: validation runs per case on the request path.
_CATEGORICAL: dict[str, bool] = {n: s.kind is FeatureKind.CATEGORICAL for n, s in FEATURES.items()}
_ALLOWED: dict[str, frozenset[str]] = {n: frozenset(s.values) for n, s in FEATURES.items()}
_APPLIES: dict[str, frozenset[str]] = {
    n: frozenset(t.value for t in s.applies_to) for n, s in FEATURES.items()
}
_DEFAULTS: dict[str, InputValue] = {n: "" if c else math.nan for n, c in _CATEGORICAL.items()}


def validate_value(name: str, value: object) -> InputValue:
    """Coerce and check one value; missing becomes "" (descriptor) or NaN (number)."""
    categorical = _CATEGORICAL.get(name)
    if categorical is None:
        raise FeatureValidationError(name, "unknown feature (see `her2low model schema`)")
    if categorical:
        if value is None:
            return ""
        if isinstance(value, Enum):
            value = value.value
        if not isinstance(value, str):
            if isinstance(value, float) and math.isnan(value):
                return ""
            raise FeatureValidationError(
                name, f"expected a string, got {type(value).__name__} {value!r}"
            )
        text = value.strip().lower()
        if text and text not in _ALLOWED[name]:
            allowed = ", ".join(FEATURES[name].values)
            raise FeatureValidationError(
                name, f"unknown value {value!r}; allowed: {allowed} or empty"
            )
        return text
    return check_feature_value(name, value)


def validate_inputs(
    inputs: Mapping[str, object],
    *,
    features: Iterable[str] | None = None,
    allow_unknown: bool = False,
) -> dict[str, InputValue]:
    """Validate a mapping of inputs and return every requested feature, coerced.

    ``features`` limits the output (default: all schema features); absent keys count as missing.
    Unknown keys raise unless ``allow_unknown``. A descriptor that does not apply to the given
    lesion type (e.g. ``mass_shape`` for an NME) is rejected rather than silently ignored, because
    it means the form or the caller has mixed two lesions up.
    """
    checked: dict[str, InputValue] = {}
    for key, value in inputs.items():
        if key in _CATEGORICAL:
            checked[key] = validate_value(key, value)
        elif not allow_unknown:
            raise FeatureValidationError(str(key), "unknown feature (see `her2low model schema`)")
    lesion = checked.get(LESION_TYPE, "")
    if lesion:
        for name, value in checked.items():
            if value != "" and _CATEGORICAL[name] and lesion not in _APPLIES[name]:
                allowed = " or ".join(t.value for t in FEATURES[name].applies_to)
                raise FeatureValidationError(
                    name, f"applies only to lesion_type {allowed}, but lesion_type is {lesion}"
                )
    if features is None:
        out = dict(_DEFAULTS)
        out.update(checked)
        return out
    result: dict[str, InputValue] = {}
    for name in features:
        if name not in _DEFAULTS:
            raise FeatureValidationError(name, "unknown feature (see `her2low model schema`)")
        result[name] = checked.get(name, _DEFAULTS[name])
    return result


def is_present(value: object) -> bool:
    """True when a (validated or raw) value counts as entered."""
    if _is_missing(value):
        return False
    return not (isinstance(value, str) and value.strip() == "")


def applies(name: str, lesion_type: str) -> bool:
    """Whether a feature is meaningful for a lesion type ("" = unknown: assume it applies)."""
    spec = feature_spec(name)
    if not lesion_type:
        return True
    return LesionType(lesion_type) in spec.applies_to
