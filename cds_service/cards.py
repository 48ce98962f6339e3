"""The CDS Hooks 2.0.1 card for a stored prediction (§CDS Service Response, §Card Attributes).

One sparing card: ``info`` for an estimate, ``warning`` only for a biopsy-HER2-0 vs MRI
discordance; the detail shows the basis (inputs used and missing, largest contributions, ROI,
QC, data date, model and whether it is the reference model), as FDA CDS criterion 4 asks.
FHIR JSON rule applies: nothing null or empty is emitted.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from cds_service.biopsy import BiopsyHer2, BiopsyReading
from cds_service.fhir import with_subject
from models import schema as feature_schema
from models.prediction import ModelVariant, Prediction

OVERRIDE_SYSTEM = "urn:her2low:override-reason"
SUMMARY_LIMIT = 139
MAX_LISTED = 8


class Indicator(StrEnum):
    """CDS Hooks card indicator."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class OverrideReasonCode(StrEnum):
    """Coded reasons offered to dismiss the card (card.overrideReasons)."""

    HER2_ESTABLISHED = "her2-established"
    IMAGE_QUALITY = "image-quality"
    DISAGREE = "disagree"
    NOT_RELEVANT = "not-relevant"

    @property
    def display(self) -> str:
        return {
            OverrideReasonCode.HER2_ESTABLISHED: "HER2 status already established by IHC/ISH",
            OverrideReasonCode.IMAGE_QUALITY: "Image quality or tumour ROI not adequate",
            OverrideReasonCode.DISAGREE: "Clinical judgement differs from the estimate",
            OverrideReasonCode.NOT_RELEVANT: "Not relevant to current care",
        }[self]


VARIANT_TEXT = {
    ModelVariant.COMBINED: "combined model (DKI histogram features + BI-RADS descriptors)",
    ModelVariant.DESCRIPTORS: "descriptor-only model (BI-RADS descriptors)",
    ModelVariant.QUANTITATIVE: (
        "quantitative-only model (DKI histogram features; descriptors not entered)"
    ),
}


@dataclass(frozen=True)
class CardContext:
    """What a card needs besides the prediction."""

    result_id: str
    card_uuid: str
    acquired_at: datetime
    computed_at: datetime
    laterality: str | None
    provenance: Mapping[str, Any]
    observation: Mapping[str, Any] | None
    observation_status: str
    case_url: str
    descriptors_url: str
    model_card_url: str
    descriptors_entered: bool
    biopsy: BiopsyReading


def _label(name: str) -> str:
    spec = feature_schema.FEATURES.get(name)
    return spec.label if spec else name


def _fmt_value(name: str, value: Any) -> str:
    spec = feature_schema.FEATURES.get(name)
    if isinstance(value, int | float) and spec is not None and not spec.is_categorical:
        shown = value * spec.display_scale
        unit = spec.display_unit if spec.display_unit and spec.display_unit != "1" else ""
        return f"{shown:.3g} {unit}".strip()
    if isinstance(value, str) and spec is not None and spec.is_categorical:
        return dict(zip(spec.values, spec.value_labels, strict=True)).get(value, value)
    return str(value)


def _side(laterality: str | None) -> str:
    return {"L": "left breast", "R": "right breast"}.get(laterality or "", "side not recorded")


def _source(ctx: CardContext, prediction: Prediction | None) -> dict[str, Any]:
    label = "HER2-low MRI estimate (her2low-cds)"
    if prediction is not None:
        label = f"{prediction.model_name} {prediction.model_version} (her2low-cds)"
    return {"label": label, "url": ctx.model_card_url}


def _override_reasons() -> list[dict[str, str]]:
    return [
        {"system": OVERRIDE_SYSTEM, "code": r.value, "display": r.display}
        for r in OverrideReasonCode
    ]


def _basis(prediction: Prediction, ctx: CardContext) -> list[str]:
    roi_value, qc_value = ctx.provenance.get("roi"), ctx.provenance.get("qc")
    roi: dict[str, Any] = roi_value if isinstance(roi_value, dict) else {}
    qc: dict[str, Any] = qc_value if isinstance(qc_value, dict) else {}
    flags = {k: v for k, v in (qc.get("flags") or {}).items() if v}
    problems = [str(p) for p in qc.get("problems") or []]
    lines = [
        f"- **Model:** {prediction.model_name} {prediction.model_version}, "
        f"{VARIANT_TEXT[prediction.variant]}"
        + (" — **reference model, not clinically validated**" if prediction.reference else ""),
        f"- **Data date:** MRI acquired {ctx.acquired_at:%Y-%m-%d} ({_side(ctx.laterality)}); "
        f"estimate computed {ctx.computed_at:%Y-%m-%d %H:%M} UTC; "
        f"Observation status {ctx.observation_status}",
        "- **Inputs used:** " + (", ".join(_label(n) for n in prediction.inputs_used) or "none"),
    ]
    if prediction.inputs_missing:
        missing = [_label(n) for n in prediction.inputs_missing]
        shown = ", ".join(missing[:MAX_LISTED])
        if len(missing) > MAX_LISTED:
            shown += f" and {len(missing) - MAX_LISTED} more (see the review app)"
        lines.append(f"- **Inputs missing:** {shown}")
    top = prediction.contributions[:3]
    if top:
        parts = [
            f"{_label(c.feature)} = {_fmt_value(c.feature, c.value)} ({c.log_odds:+.2f})"
            for c in top
        ]
        lines.append("- **Largest contributions (log-odds):** " + "; ".join(parts))
    roi_source = roi.get("source") or "not recorded"
    confirmed = "confirmed" if roi.get("confirmed") else "not confirmed"
    volume = f", {roi['volume_ml']:.1f} mL" if isinstance(roi.get("volume_ml"), int | float) else ""
    lines.append(f"- **Tumour ROI:** source {roi_source}{volume}, {confirmed}")
    if flags or problems:
        qc_text = ", ".join(f"{k}: {v}" for k, v in flags.items())
        if problems:
            qc_text = "; ".join(filter(None, [qc_text, *problems]))
        lines.append(f"- **QC flags:** {qc_text}")
    else:
        lines.append("- **QC flags:** none")
    return lines


def biopsy_line(biopsy: BiopsyReading) -> str:
    """The detail line on the chart's biopsy HER2 result (varies per call: from the prefetch)."""
    if biopsy.status is BiopsyHer2.UNKNOWN:
        return "- **Biopsy HER2:** no HER2 result found in the chart"
    when = f" ({biopsy.date[:10]})" if biopsy.date else ""
    reading = "HER2 0" if biopsy.status is BiopsyHer2.ZERO else (biopsy.text or "recorded")
    return f"- **Biopsy HER2:** {reading}, LOINC {biopsy.code}{when}"


def is_discordant(prediction: Prediction, biopsy: BiopsyReading) -> bool:
    """Biopsy HER2 0 while the MRI estimate is at/above threshold (the only ``warning``)."""
    return prediction.above_threshold and biopsy.status is BiopsyHer2.ZERO


def prediction_card(prediction: Prediction, ctx: CardContext, patient_id: str) -> dict[str, Any]:
    """The card for a stored prediction (discordance → warning)."""
    return build_prediction_card(
        prediction,
        ctx,
        patient_id,
        discordant=is_discordant(prediction, ctx.biopsy),
        biopsy_text=biopsy_line(ctx.biopsy),
    )


def build_prediction_card(
    prediction: Prediction,
    ctx: CardContext,
    patient_id: str,
    *,
    discordant: bool,
    biopsy_text: str,
) -> dict[str, Any]:
    """The card with the per-call parts (patient, biopsy line, discordance) given explicitly.

    Split out so the hook can prepare the card once per stored prediction with placeholders
    for the per-call parts (``card_cache``) and only substitute them on each call.
    """
    percent = prediction.probability * 100
    threshold = prediction.threshold * 100
    side = _side(ctx.laterality)
    if discordant:
        summary = (
            f"Biopsy HER2 0, but MRI estimate suggests HER2-low ({percent:.0f}%): consider review"
        )
        indicator = Indicator.WARNING
    else:
        band = "at/above" if prediction.above_threshold else "below"
        summary = (
            f"MRI HER2-low likelihood {percent:.0f}% ({band} {threshold:.0f}% threshold), {side}"
        )
        indicator = Indicator.INFO
    detail = [
        "**Statistical estimate — confirm HER2 status by IHC/ISH.** Not a pathology result.",
        "",
        f"Likelihood of HER2-low (among HER2 0, HER2-low and HER2-positive) from breast MRI: **{percent:.0f}%** "
        f"(operating threshold {threshold:.0f}%).",
        "",
    ]
    if discordant:
        detail.append(
            "The chart records a biopsy HER2 score of 0 while the MRI estimate is at or above the "
            "threshold: a tumour board may consider re-testing (e.g. another block or ISH)."
        )
        detail.append("")
    if not ctx.descriptors_entered:
        detail.append(
            f"Radiologist descriptors have not been entered: [enter them]({ctx.descriptors_url}) "
            "to obtain the combined estimate."
        )
    detail += ["", *_basis(prediction, ctx), biopsy_text, ""]
    detail.append(f"[Model card]({ctx.model_card_url}) · [Case in review app]({ctx.case_url})")
    card: dict[str, Any] = {
        "uuid": ctx.card_uuid,
        "summary": summary[:SUMMARY_LIMIT],
        "detail": "\n".join(detail),
        "indicator": indicator.value,
        "source": _source(ctx, prediction),
        "overrideReasons": _override_reasons(),
        "links": [
            {
                "label": "Open case in the HER2-low review app",
                "url": ctx.case_url,
                "type": "absolute",
            }
        ],
    }
    card = prune(card)
    if ctx.observation:
        # The Observation is already FHIR JSON without empty values (fhir.py); not re-walked.
        resource = with_subject(ctx.observation, patient_id, None)
        card["suggestions"] = [
            {
                "label": f"File the MRI HER2-low estimate ({ctx.observation_status}) in the chart",
                "uuid": str(uuid.uuid5(uuid.UUID(ctx.card_uuid), "file-observation")),
                "actions": [
                    {
                        "type": "create",
                        "description": "Create an Observation: HER2-low likelihood from breast MRI "
                        "(statistical estimate)",
                        "resource": resource,
                    }
                ],
            }
        ]
        card["selectionBehavior"] = "at-most-one"
    return card


def descriptors_needed_card(ctx: CardContext) -> dict[str, Any]:
    """No estimate can be shown yet: say so and link to the descriptor entry form."""
    detail = [
        "A breast MRI of this patient was analysed, but no HER2-low estimate is available yet: "
        "the radiologist's BI-RADS descriptors have not been entered.",
        "",
        f"- **Data date:** MRI acquired {ctx.acquired_at:%Y-%m-%d} ({_side(ctx.laterality)})",
        f"- [Enter descriptors]({ctx.descriptors_url})",
        "",
        "Any estimate will be a statistical estimate — confirm HER2 status by IHC/ISH.",
    ]
    card: dict[str, Any] = {
        "uuid": ctx.card_uuid,
        "summary": "MRI HER2-low estimate pending: radiologist descriptors needed",
        "detail": "\n".join(detail),
        "indicator": Indicator.INFO.value,
        "source": _source(ctx, None),
        "overrideReasons": _override_reasons(),
        "links": [
            {"label": "Enter MRI descriptors", "url": ctx.descriptors_url, "type": "absolute"}
        ],
    }
    pruned: dict[str, Any] = prune(card)
    return pruned


def prune(value: Any) -> Any:
    """Drop None, "", [] and {} recursively (FHIR JSON / CDS Hooks: omit what is absent)."""
    if isinstance(value, dict):
        out = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [prune(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value
