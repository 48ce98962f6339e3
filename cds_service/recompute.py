"""Re-score stored cases when a different model version is deployed (a background thread).

The service keeps every prediction row; a case's latest row names the model that scored it
(``prediction.model_name`` / ``model_version``). When the service starts with another model —
a new registry version, or ``HER2LOW_MODEL_DIR`` pointed elsewhere — the cases scored by another
version are recomputed one by one (newest row per case), each audited with the old and the new
version, so the worklist and the EHR card follow the deployed model without a manual step.

Several workers may run the job at once: each re-reads a case's latest row right before scoring
it, so a case another worker has just re-scored is skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cds_service.audit import SERVICE_ACTOR, AuditAction
from cds_service.predictions import PredictionService, RuntimeUnavailableError
from cds_service.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model scores cases: (name, version)."""

    name: str
    version: str

    @classmethod
    def of_prediction(cls, prediction: Mapping[str, Any] | None) -> ModelIdentity | None:
        if not prediction:
            return None
        name, version = prediction.get("model_name"), prediction.get("model_version")
        if not isinstance(name, str) or not isinstance(version, str):
            return None
        return cls(name, version)

    @classmethod
    def of_runtime(cls, runtime: object) -> ModelIdentity | None:
        """The deployed model: ``ModelRuntime.cards`` (variant -> card) or name/version attributes."""
        cards = getattr(runtime, "cards", None)
        if isinstance(cards, Mapping) and cards:
            card = next(iter(cards.values()))
            if isinstance(card, Mapping):
                return cls(str(card.get("name")), str(card.get("version")))
        name, version = (
            getattr(runtime, "model_name", None),
            getattr(runtime, "model_version", None),
        )
        if isinstance(name, str) and isinstance(version, str):
            return cls(name, version)
        return None

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


class RecomputeJob:
    """Finds the cases scored by another model version and re-scores them."""

    def __init__(self, store: Store, predictions: PredictionService) -> None:
        self.store = store
        self.predictions = predictions
        self.done = threading.Event()
        self.recomputed = 0

    def deployed(self) -> ModelIdentity | None:
        try:
            return ModelIdentity.of_runtime(self.predictions.runtime.get())
        except RuntimeUnavailableError:
            return None

    def stale(
        self,
        deployed: ModelIdentity,
        latest: list[tuple[str, dict[str, Any] | None]] | None = None,
    ) -> list[str]:
        """Cases whose latest estimate came from another model (unscored rows are left alone)."""
        return [
            rid
            for rid, prediction in (self.store.latest_predictions() if latest is None else latest)
            if (scored := ModelIdentity.of_prediction(prediction)) is not None
            and scored != deployed
        ]

    def run_once(self) -> int:
        """Re-score every stale case; returns how many were re-scored."""
        latest = self.store.latest_predictions()
        if not latest:
            return 0  # a new database: nothing to re-score, and no reason to load the model
        deployed = self.deployed()
        if deployed is None:
            return 0
        count = 0
        for rid in self.stale(deployed, latest):
            case = self.store.case(rid)
            current = ModelIdentity.of_prediction(
                case.prediction.prediction if case and case.prediction else None
            )
            if current is None or current == deployed:
                continue  # re-scored meanwhile (another worker) or no estimate any more
            row = self.predictions.recompute(rid)
            now = ModelIdentity.of_prediction(row.prediction if row else None)
            self.store.audit(
                SERVICE_ACTOR,
                AuditAction.PREDICTIONS_RECOMPUTED,
                rid,
                {"from": str(current), "to": str(now) if now else None},
            )
            count += 1
        if count:
            log.info("cases re-scored with the deployed model", extra={"cases": count})
        self.recomputed += count
        return count

    def _run(self) -> None:
        try:
            self.run_once()
        except Exception:  # a background thread must not die silently
            log.exception("re-scoring stored cases failed")
        finally:
            self.done.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="her2low-recompute", daemon=True)
        thread.start()
        return thread
