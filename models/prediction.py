"""What a prediction carries to the service: the likelihood and everything needed to explain it.

This is the contract between ``models.runtime`` (which produces it) and ``cds_service`` (which
turns it into a card, an Observation and a review page). Frozen and JSON-serialisable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class ModelVariant(StrEnum):
    """Which inputs the chosen model uses (the runtime picks by what is available)."""

    COMBINED = "combined"
    DESCRIPTORS = "descriptors"
    QUANTITATIVE = "quantitative"


@dataclass(frozen=True)
class Contribution:
    """One term of the logistic model's log-odds for HER2-low.

    ``log_odds`` is coefficient x standardised value (numeric) or the coefficient of the active
    one-hot level (categorical); ``value`` is the input as given.
    """

    feature: str
    value: str | float | None
    log_odds: float


@dataclass(frozen=True)
class Prediction:
    """The HER2-low likelihood of one lesion with its basis. A statistical estimate only."""

    probability: float  # P(HER2-low), 0..1
    classes: tuple[str, ...]  # e.g. ("zero", "low", "over")
    probabilities: tuple[float, ...]  # same order as classes
    threshold: float  # operating threshold on ``probability``
    model_name: str
    model_version: str
    variant: ModelVariant
    reference: bool  # True for the shipped reference model (not clinically validated)
    onnx_sha256: str
    inputs_used: tuple[str, ...]
    inputs_missing: tuple[str, ...]
    contributions: tuple[Contribution, ...] = field(default=())  # largest |log_odds| first

    @property
    def above_threshold(self) -> bool:
        return self.probability >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["variant"] = self.variant.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        values = dict(data)
        values["variant"] = ModelVariant(values["variant"])
        values["classes"] = tuple(values["classes"])
        values["probabilities"] = tuple(values["probabilities"])
        values["inputs_used"] = tuple(values["inputs_used"])
        values["inputs_missing"] = tuple(values["inputs_missing"])
        values["contributions"] = tuple(Contribution(**c) for c in values.get("contributions", ()))
        return cls(**values)
