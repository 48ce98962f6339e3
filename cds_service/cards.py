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

from pydantic import BaseModel, ConfigDict, ValidationError

from cds_service.biopsy import BiopsyHer2, BiopsyReading
from cds_service.display import VARIANT_TEXT, format_value, label
from cds_service.display import side as side_text
from cds_service.fhir_transparency import (
    DescriptorSource,
    action_descriptions,
    build_transparency,
)
from cds_service.qc_gate import QcFailure
from her2low.core.enums import LabelledEnum
from models.contract import QcReport, RoiProvenance
from models.prediction import Prediction

OVERRIDE_SYSTEM = "urn:her2low:override-reason"
SUMMARY_LIMIT = 139
MAX_LISTED = 8


class Indicator(StrEnum):
    """CDS Hooks card indicator."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class OverrideReasonCode(LabelledEnum):
    """Coded reasons offered to dismiss the card (card.overrideReasons)."""

    HER2_ESTABLISHED = "her2-established", "HER2 status already established by IHC/ISH"
    IMAGE_QUALITY = "image-quality", "Image quality or tumour ROI not adequate"
    DISAGREE = "disagree", "Clinical judgement differs from the estimate"
    NOT_RELEVANT = "not-relevant", "Not relevant to current care"


class PredictionBasis(BaseModel):
    """What a stored prediction row keeps for its card (``PredictionRow.basis``).

    ``not_scored`` is the reason the case has no estimate although its inputs are complete
    (its fit or discretisation settings differ from the model's: no card is shown for it; or it
    failed the QC gate: ``qc_failures`` says why and what to do, on a card of its own).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    roi: RoiProvenance | None = None
    qc: QcReport | None = None
    descriptors_entered: bool = False
    not_scored: str | None = None
    qc_failures: tuple[QcFailure, ...] = ()
    #: Where a scored case leaves the model's training domain (``models.domain``).
    ood_warnings: tuple[str, ...] = ()

    @classmethod
    def stored(cls, data: object) -> PredictionBasis:
        """The stored JSON read back (an unreadable or absent basis reads as empty)."""
        try:
            return cls.model_validate(data or {})
        except ValidationError:
            return cls()


def ood_text(warnings: tuple[str, ...] | list[str]) -> str:
    """One sentence for the card, the Observation note and the review page."""
    return (
        "Outside the model's training data — interpret with caution: " + "; ".join(warnings) + "."
    )


@dataclass(frozen=True)
class CardContext:
    """What a card needs besides the prediction."""

    result_id: str
    card_uuid: str
    acquired_at: datetime
    computed_at: datetime
    laterality: str | None
    roi: RoiProvenance | None
    qc: QcReport | None
    observation: Mapping[str, Any] | None
    observation_status: str
    case_url: str
    descriptors_url: str
    model_card_url: str
    descriptors_entered: bool
    biopsy: BiopsyReading
    # AI-transparency companions (fhir_transparency): who entered the descriptors, model card
    descriptors_source: DescriptorSource | None = None
    model_card_markdown: str | None = None
    ood_warnings: tuple[str, ...] = ()


def _source(ctx: CardContext, prediction: Prediction | None) -> dict[str, Any]:
    text = "HER2-low MRI estimate (her2low-cds)"
    if prediction is not None:
        text = f"{prediction.model_name} {prediction.model_version} (her2low-cds)"
    return {"label": text, "url": ctx.model_card_url}


def _override_reasons() -> list[dict[str, str]]:
    return [
        {"system": OVERRIDE_SYSTEM, "code": r.value, "display": r.display}
        for r in OverrideReasonCode
    ]


def _basis(prediction: Prediction, ctx: CardContext) -> list[str]:
    flags = ctx.qc.flags.raised() if ctx.qc else {}
    problems = list(ctx.qc.problems) if ctx.qc else []
    lines = [
        f"- **Model:** {prediction.model_name} {prediction.model_version}, "
        f"{VARIANT_TEXT[prediction.variant]}"
        + (" — **reference model, not clinically validated**" if prediction.reference else ""),
        f"- **Data date:** MRI acquired {ctx.acquired_at:%Y-%m-%d} ({side_text(ctx.laterality)}); "
        f"estimate computed {ctx.computed_at:%Y-%m-%d %H:%M} UTC; "
        f"Observation status {ctx.observation_status}",
        "- **Inputs used:** " + (", ".join(label(n) for n in prediction.inputs_used) or "none"),
    ]
    if prediction.inputs_missing:
        missing = [label(n) for n in prediction.inputs_missing]
        shown = ", ".join(missing[:MAX_LISTED])
        if len(missing) > MAX_LISTED:
            shown += f" and {len(missing) - MAX_LISTED} more (see the review app)"
        lines.append(f"- **Inputs missing:** {shown}")
    top = prediction.contributions[:3]
    if top:
        parts = [
            f"{label(c.feature)} = {format_value(c.feature, c.value)} ({c.log_odds:+.2f})"
            for c in top
        ]
        lines.append("- **Largest contributions (log-odds):** " + "; ".join(parts))
    roi = ctx.roi
    roi_source = roi.source.value if roi else "not recorded"
    confirmed = "confirmed" if roi and roi.confirmed else "not confirmed"
    volume = f", {roi.volume_ml:.1f} mL" if roi and roi.volume_ml is not None else ""
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
    side = side_text(ctx.laterality)
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
    if ctx.ood_warnings:
        summary += " — outside training data"
    detail = [
        "**Statistical estimate — confirm HER2 status by IHC/ISH.** Not a pathology result.",
        "",
        f"Likelihood of HER2-low (among HER2 0, HER2-low and HER2-positive) from breast MRI: **{percent:.0f}%** "
        f"(operating threshold {threshold:.0f}%).",
        "",
    ]
    if ctx.ood_warnings:
        detail += [f"**{ood_text(ctx.ood_warnings)}**", ""]
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
        # One create action per resource (CDS Hooks 2.0.1: a suggestion's actions are processed
        # as one transaction, so their relative references resolve): the Observation first.
        resources = build_transparency(
            observation=ctx.observation,
            prediction=prediction,
            computed_at=ctx.computed_at,
            patient_id=patient_id,
            model_card_markdown=ctx.model_card_markdown,
            model_card_url=ctx.model_card_url,
            descriptors=ctx.descriptors_source,
        ).resources()
        card["suggestions"] = [
            {
                "label": f"File the MRI HER2-low estimate ({ctx.observation_status}) in the chart",
                "uuid": str(uuid.uuid5(uuid.UUID(ctx.card_uuid), "file-observation")),
                "actions": [
                    {"type": "create", "description": description, "resource": resource}
                    for resource, description in zip(
                        resources, action_descriptions(resources), strict=True
                    )
                ],
            }
        ]
        card["selectionBehavior"] = "at-most-one"
    return card


#: Said on the cards that carry no estimate too: every output names what the model is.
NO_ESTIMATE_NOTE = (
    "Any estimate is a statistical estimate from a model (the shipped reference model is not "
    "clinically validated; a site must train and validate its own) — confirm HER2 status by "
    "IHC/ISH."
)


def descriptors_needed_card(ctx: CardContext) -> dict[str, Any]:
    """No estimate can be shown yet: say so and link to the descriptor entry form."""
    detail = [
        "A breast MRI of this patient was analysed, but no HER2-low estimate is available yet: "
        "the radiologist's BI-RADS descriptors have not been entered.",
        "",
        f"- **Data date:** MRI acquired {ctx.acquired_at:%Y-%m-%d} ({side_text(ctx.laterality)})",
        f"- [Enter descriptors]({ctx.descriptors_url})",
        "",
        NO_ESTIMATE_NOTE,
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


def qc_failed_card(ctx: CardContext, failures: tuple[QcFailure, ...]) -> dict[str, Any]:
    """The result failed the QC gate: no likelihood; say why and what to do."""
    first = failures[0].reason if failures else "image quality"
    return _no_estimate_card(
        ctx,
        summary=f"No MRI HER2-low estimate: QC failed ({first})",
        why="the diffusion series did not pass the image-quality check, and an estimate from it "
        "would be built on noise.",
        lines=[f"- **{f.reason}**: {f.action}" for f in failures],
    )


def not_scored_card(ctx: CardContext, reason: str) -> dict[str, Any]:
    """The result's analysis settings differ from the model's: no likelihood; say so.

    This happens when the node had to fall back from its default fit (the analysis notes say
    why, e.g. no background to estimate the noise from) or when the node and the model are
    configured differently. Either way the clinician sees that the MRI was analysed and why
    there is no number, instead of no card at all.
    """
    notes = list(ctx.qc.problems) if ctx.qc else []
    return _no_estimate_card(
        ctx,
        summary="No MRI HER2-low estimate: analysis settings differ from the model's",
        why="its diffusion features were computed with other analysis settings than the model "
        "was trained on, so the model cannot score them.",
        lines=[
            f"- **Settings:** {reason}",
            *(f"- **Analysis note:** {note}" for note in notes),
            "- **What to do:** ask imaging IT to re-analyse the series with the model's settings "
            "(see the case page), or to install a model trained on features computed this way.",
        ],
    )


def _no_estimate_card(
    ctx: CardContext, *, summary: str, why: str, lines: list[str]
) -> dict[str, Any]:
    """An analysed MRI without an estimate: why, what to do, and a link to the case."""
    detail = [
        "A breast MRI of this patient was analysed, but **no HER2-low estimate is given**: " + why,
        "",
        *lines,
        "",
        f"- **Data date:** MRI acquired {ctx.acquired_at:%Y-%m-%d} ({side_text(ctx.laterality)})",
        f"- [Case in review app]({ctx.case_url})",
        "",
        NO_ESTIMATE_NOTE,
    ]
    card: dict[str, Any] = {
        "uuid": ctx.card_uuid,
        "summary": summary[:SUMMARY_LIMIT],
        "detail": "\n".join(detail),
        "indicator": Indicator.INFO.value,
        "source": _source(ctx, None),
        "overrideReasons": _override_reasons(),
        "links": [
            {
                "label": "Open case in the HER2-low review app",
                "url": ctx.case_url,
                "type": "absolute",
            }
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
