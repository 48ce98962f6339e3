"""Where a case stands on the tumour-board worklist, and the one discordance rule.

The state is derived, never entered: :meth:`CaseState.derive` reads the facts of a case (viewed,
descriptors, ROI confirmation, board decision, pathology) and the store keeps the result in the
``results.state`` column (refreshed in the same transaction as every write that changes a fact),
so the worklist filters and counts 10,000 cases with an index instead of re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass

from her2low.core.enums import LabelledEnum
from models import schema as feature_schema


class CaseState(LabelledEnum):
    """Worklist states, in the order a case moves through them."""

    NEW = "new", "New", "received; nobody has opened it or entered anything yet"
    DESCRIPTORS_NEEDED = (
        "descriptors-needed",
        "Descriptors needed",
        "opened, but descriptors incomplete or ROI unconfirmed",
    )
    READY_FOR_BOARD = (
        "ready-for-board",
        "Ready for board",
        "descriptors complete and ROI confirmed; no decision yet",
    )
    DISCUSSED = "discussed", "Discussed", "the board confirmed or amended the estimate"
    CLOSED = "closed", "Closed", "withdrawn by the board, or discussed with a pathology HER2 result"

    @property
    def rule(self) -> str:
        """The rule in words (shown on the worklist so a reader knows what a state means)."""
        return self.description

    @classmethod
    def derive(cls, facts: CaseFacts) -> CaseState:
        """The state of a case from its facts (first matching rule, from the end backwards)."""
        if facts.withdrawn or (facts.decided and facts.pathology_known):
            return cls.CLOSED
        if facts.decided:
            return cls.DISCUSSED
        if facts.descriptors_complete and facts.roi_confirmed:
            return cls.READY_FOR_BOARD
        if facts.viewed or facts.descriptors_entered or facts.roi_confirmed:
            return cls.DESCRIPTORS_NEEDED
        return cls.NEW


@dataclass(frozen=True)
class CaseFacts:
    """What :meth:`CaseState.derive` needs to know about a case."""

    viewed: bool = False
    descriptors_entered: bool = False
    descriptors_complete: bool = False
    roi_confirmed: bool = False
    decided: bool = False  # a board decision (confirm / amend) was recorded
    withdrawn: bool = False  # the board withdrew the estimate (entered-in-error)
    pathology_known: bool = False


def descriptors_complete(values: dict[str, str]) -> bool:
    """Every non-optional descriptor that applies to the entered lesion type is entered."""
    lesion = values.get(feature_schema.LESION_TYPE, "")
    if not lesion:
        return False
    return all(
        spec.optional or not feature_schema.applies(spec.name, lesion) or values.get(spec.name)
        for spec in feature_schema.DESCRIPTORS
    )


def is_discordant(*, above_threshold: bool, biopsy_her2_zero: bool) -> bool:
    """Biopsy HER2 0 while the MRI estimate is at or above the operating threshold.

    The one rule of the patient-view card's discordance banner and of the review app's flag:
    the estimate suggests HER2-low where the biopsy said HER2 0, so re-testing may be worth it.
    """
    return above_threshold and biopsy_her2_zero
