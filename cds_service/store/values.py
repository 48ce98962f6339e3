"""The store's coded values and the small records it hands out (no database access here)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cds_service.audit import AuditAction
from cds_service.orm import (
    DescriptorEntry,
    PredictionRow,
    Result,
    ResultRevision,
)
from her2low.core.enums import LabelledEnum
from models.contract import Provenance


class IngestStatus(StrEnum):
    """Results API answers (docs/results-api.md)."""

    CREATED = "created"
    UNCHANGED = "unchanged"
    UPDATED = "updated"


class ObservationStatus(StrEnum):
    """FHIR R4 ObservationStatus values this service moves through."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    AMENDED = "amended"
    ENTERED_IN_ERROR = "entered-in-error"


class BoardDecision(StrEnum):
    """A tumour-board decision on a case's estimate (FHIR status it leads to, see below)."""

    CONFIRM = "confirm"
    AMEND = "amend"
    ENTERED_IN_ERROR = "entered-in-error"

    @property
    def observation_status(self) -> ObservationStatus | None:
        """None: the automatic status (preliminary/final) stands."""
        return {
            BoardDecision.CONFIRM: None,
            BoardDecision.AMEND: ObservationStatus.AMENDED,
            BoardDecision.ENTERED_IN_ERROR: ObservationStatus.ENTERED_IN_ERROR,
        }[self]


class ReviewFlag(StrEnum):
    """Why a case is held for review instead of being shown."""

    IDENTITY_AMBIGUOUS = "identity-ambiguous"


class Her2Pathology(LabelledEnum):
    """The pathology HER2 group (ASCO/CAP 2023 with the HER2-low category).

    LOW: IHC 1+, or IHC 2+ with ISH not amplified; POSITIVE: IHC 3+, or 2+ with ISH amplified.
    """

    ZERO = "zero", "HER2 0"
    LOW = "low", "HER2-low (1+, or 2+ ISH not amplified)"
    POSITIVE = "positive", "HER2-positive (3+, or 2+ ISH amplified)"


class PathologySource(StrEnum):
    """Where a pathology HER2 result came from."""

    PATHOLOGIST = "pathologist"  # entered on the review app
    EHR = "ehr"  # a FHIR Observation seen in the CDS Hooks prefetch


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the audit page and its CSV export (None: any)."""

    actor: str | None = None
    action: AuditAction | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive
    result_id: str | None = None


@dataclass(frozen=True)
class ConcordanceRow:
    """One case with a later pathology result: the latest prediction against it."""

    result_id: str
    acquired_at: datetime
    probability: float | None
    prediction: dict[str, Any] | None
    her2: Her2Pathology
    score: str
    reported_at: datetime
    features: dict[str, Any]
    provenance: dict[str, Any]


class NotFoundError(LookupError):
    """No such case."""


class UnknownCardError(NotFoundError):
    """Feedback names a card this service never issued (``index``: its place in the batch)."""

    def __init__(self, index: int, card: str) -> None:
        super().__init__(f"feedback {index}: unknown card")
        self.index = index
        self.card = card


def canonical_hash(data: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces): equal content, equal hash."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None so JSON columns stay valid JSON (PostgreSQL refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class HookRow:
    """What a hook call needs of one result: identity keys and its latest prediction's key.

    Light columns only: the prediction's JSON (prediction, Observation, basis) is read by
    ``prediction_parts`` only when a worker has not yet prepared the card of that prediction.
    """

    result_id: str
    patient_issuer: str
    patient_id: str
    review_flag: str | None
    acquired_at: datetime
    laterality: str | None
    prediction_id: int | None
    observation_status: str | None
    card_uuid: str | None
    computed_at: datetime | None


@dataclass(frozen=True)
class HookLookup:
    """A hook lookup's rows and the ``hook_generation`` read just before them.

    ``generation`` None: the counter row is missing, so the lookup must not be reused.
    """

    generation: int | None
    rows: list[HookRow]


class StaleLookupError(Exception):
    """The reused lookup's generation is no longer the database's; nothing was written."""


@dataclass(frozen=True)
class PredictionParts:
    """The JSON columns of one prediction row (immutable once inserted)."""

    prediction: dict[str, Any] | None
    observation: dict[str, Any] | None
    basis: dict[str, Any] | None


AuditTuple = tuple[str, str, str | None, dict[str, Any] | None]


@dataclass(frozen=True)
class UsedToken:
    """A verified token's replay key, kept until ``expires`` (exp + leeway)."""

    iss: str
    jti: str
    expires: datetime

    @classmethod
    def of(cls, iss: str, jti: str, exp: int, leeway: int) -> UsedToken:
        return cls(iss, jti, datetime.fromtimestamp(exp, UTC) + timedelta(seconds=leeway))


@dataclass(frozen=True)
class CaseSnapshot:
    """Everything known about one case, read in one transaction.

    ``provenance`` and ``features`` are the current revision's payload read back through the
    results contract (``models.contract``); ``provenance`` is None for a row stored before it.
    """

    result: Result
    revision: ResultRevision
    descriptors: DescriptorEntry | None
    prediction: PredictionRow | None
    provenance: Provenance | None
    features: dict[str, float | None]
