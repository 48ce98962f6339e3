"""How people read the model's inputs: labels, values with units, the side, the model variant.

One copy for the card (cards.py) and the review pages (review/), so a feature reads the same in
the EHR and in the tumour-board app. Vocabulary and units come from ``models.schema``.
"""

from __future__ import annotations

from models import schema as feature_schema
from models.contract import Laterality
from models.prediction import ModelVariant

VARIANT_TEXT = {
    ModelVariant.COMBINED: "combined model (DKI histogram features + BI-RADS descriptors)",
    ModelVariant.DESCRIPTORS: "descriptor-only model (BI-RADS descriptors)",
    ModelVariant.QUANTITATIVE: (
        "quantitative-only model (DKI histogram features; descriptors not entered)"
    ),
}

_SIDES = {Laterality.LEFT: "left breast", Laterality.RIGHT: "right breast"}
#: The schema's ASCII unit spelling, typeset for HTML pages.
_TYPESET = {"10^-3 mm2/s": "×10⁻³ mm²/s"}


def label(name: str) -> str:
    """The human label of a schema input (its name if unknown)."""
    spec = feature_schema.FEATURES.get(name)
    return spec.label if spec else name


def format_value(
    name: str, value: str | float | None, *, digits: int = 3, typeset: bool = False
) -> str:
    """A value as people read it: numbers scaled to the display unit, codes as their labels.

    ``digits`` significant digits; ``typeset`` writes units as in print (10⁻³ mm²/s) for HTML.
    Missing is "—".
    """
    if value is None:
        return "—"
    spec = feature_schema.FEATURES.get(name)
    if spec is None:
        return str(value)
    if spec.is_categorical:
        text = str(value)
        return dict(zip(spec.values, spec.value_labels, strict=True)).get(text, text)
    if isinstance(value, str):
        return value
    unit = spec.display_unit if spec.display_unit and spec.display_unit != "1" else ""
    if typeset:
        unit = _TYPESET.get(unit, unit)
    return f"{value * spec.display_scale:.{digits}g} {unit}".strip()


def side(laterality: Laterality | str | None, missing: str = "side not recorded") -> str:
    """ "left breast" / "right breast", or ``missing``."""
    if not laterality:
        return missing
    try:
        return _SIDES[Laterality(laterality)]
    except ValueError:
        return missing
