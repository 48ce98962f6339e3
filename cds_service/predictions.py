"""Recompute a case's prediction whenever its inputs change (features or descriptors).

CDS Hooks 2.0.1 asks for answers in well under 500 ms, so the model runs here — on ingest and on
descriptor entry — and the hook only reads the stored prediction and its prepared Observation.

A result whose fit or discretisation settings differ from the model's (``models.contract``) is
not scored: the case keeps a prediction row with the reason and no likelihood, the hook shows no
card for it, and ``her2low_results_not_scored_total`` counts it. A result failing the QC gate
(``cds_service.qc_gate``) takes the same path with reason ``qc``, but keeps its failures in the
basis: the hook shows a card saying why there is no estimate and what to do.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter

from cds_service.cards import PredictionBasis, ood_text
from cds_service.fhir import build_observation
from cds_service.orm import PredictionRow, utcnow
from cds_service.qc_gate import QcThresholds, evaluate
from cds_service.store import CaseSnapshot, ObservationStatus, Store, json_safe
from models import schema as feature_schema
from models.contract import AnalysisConventions, Provenance, SettingsMismatchError
from models.domain import TrainingDomain, outside
from models.prediction import Prediction

log = logging.getLogger(__name__)

NOT_SCORED = Counter(
    "her2low_results_not_scored",
    "Results not scored: settings differ from the model's (mismatch, unstated) or QC failed (qc)",
    ["reason"],
)
OUT_OF_DISTRIBUTION = Counter(
    "her2low_results_out_of_distribution",
    "Results scored with a warning: outside the model's training domain (models.domain)",
)
UNSTATED = "the result does not state its fit and discretisation settings"


class Predictor(Protocol):
    """What the service needs from ``models.runtime.ModelRuntime``.

    ``predict`` raises ``models.contract.SettingsMismatchError`` when ``conventions`` (the
    result's settings) differ from those the model was trained with.
    """

    def predict(
        self,
        inputs: Mapping[str, str | float | None],
        *,
        conventions: AnalysisConventions | None = None,
    ) -> Prediction: ...


class RuntimeUnavailableError(RuntimeError):
    """The model runtime could not be loaded."""


class RuntimeProvider:
    """The injected predictor, or ``ModelRuntime.load(model_dir)`` loaded once on first use."""

    def __init__(self, injected: Predictor | None, model_dir: Path | None) -> None:
        self._runtime = injected
        self._model_dir = model_dir
        self._lock = threading.Lock()

    def get(self) -> Predictor:
        if self._runtime is not None:
            return self._runtime
        with self._lock:
            if self._runtime is None:
                try:
                    from models.runtime import ModelRuntime
                except ImportError as exc:
                    raise RuntimeUnavailableError("models.runtime is not installed") from exc
                try:
                    self._runtime = ModelRuntime.load(self._model_dir)
                except Exception as exc:
                    raise RuntimeUnavailableError(f"model could not be loaded: {exc}") from exc
            return self._runtime

    @property
    def model_card(self) -> str | None:
        """The model card text, when the runtime exposes one."""
        try:
            runtime = self.get()
        except RuntimeUnavailableError:
            return None
        cards = getattr(runtime, "cards", None)  # ModelRuntime: variant -> model card dict
        if isinstance(cards, Mapping) and cards:
            try:
                from models.card import render_markdown
            except ImportError:
                return "\n\n".join(json.dumps(c, indent=2, default=str) for c in cards.values())
            return "\n\n---\n\n".join(render_markdown(c) for c in cards.values())
        card = getattr(runtime, "model_card", None)
        if callable(card):
            card = card()
        return card if isinstance(card, str) else None


def model_inputs(case: CaseSnapshot) -> dict[str, str | float | None]:
    """All schema inputs: features from the result, descriptors from the latest entry."""
    inputs: dict[str, str | float | None] = {
        name: case.features.get(name) for name in feature_schema.QUANTITATIVE_NAMES
    }
    values = case.descriptors.values if case.descriptors else {}
    for name in feature_schema.DESCRIPTOR_NAMES:
        inputs[name] = values.get(name) or None
    return inputs


def observation_status(case: CaseSnapshot) -> ObservationStatus:
    """A tumour-board override (amended / entered-in-error) wins; otherwise final once a
    radiologist entered descriptors and confirmed the ROI; else preliminary (FHIR R4
    ObservationStatus)."""
    if case.result.observation_override:
        return ObservationStatus(case.result.observation_override)
    entry = case.descriptors  # an ROI confirmed before any descriptor is not yet final
    if entry is not None and entry.roi_confirmed and entry.values:
        return ObservationStatus.FINAL
    return ObservationStatus.PRELIMINARY


class PredictionService:
    """Runs the model for a case and stores the prediction with its Observation."""

    def __init__(
        self, store: Store, runtime: RuntimeProvider, qc: QcThresholds | None = None
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.qc = qc or QcThresholds()

    def _not_scored(
        self, row: PredictionRow, basis: PredictionBasis, why: str, *, kind: str
    ) -> PredictionRow:
        """Store the case's row without a likelihood, with the reason the card and page show."""
        reason = f"not scored: {why}"[:2000]
        row.error = reason
        row.basis = basis.model_copy(update={"not_scored": reason}).model_dump(
            mode="json", exclude_none=True
        )
        NOT_SCORED.labels(reason=kind).inc()
        log.warning(
            "result not scored",
            extra={"result_id": row.result_id, "reason": kind},
        )
        return self.store.save_prediction(row)

    def _outside(
        self,
        prediction: Prediction,
        provenance: Provenance,
        features: Mapping[str, float | None],
    ) -> list[str]:
        """Where the case leaves the chosen model's training domain (its card's record)."""
        try:
            cards = getattr(self.runtime.get(), "cards", None)
        except RuntimeUnavailableError:
            return []
        card = cards.get(prediction.variant) if isinstance(cards, Mapping) else None
        domain = TrainingDomain.from_card(card) if isinstance(card, Mapping) else None
        return [] if domain is None else outside(domain, provenance, features)

    def recompute(self, result_id: str) -> PredictionRow | None:
        case = self.store.case(result_id)
        if case is None:
            return None
        row = PredictionRow(
            result_id=result_id,
            revision=case.result.revision,
            descriptors_version=case.descriptors.version if case.descriptors else None,
            card_uuid=str(uuid.uuid4()),
            computed_at=utcnow(),
        )
        status = observation_status(case)
        row.observation_status = status.value
        provenance = case.provenance
        basis = PredictionBasis(
            roi=provenance.roi if provenance else None,
            qc=provenance.qc if provenance else None,
            descriptors_entered=bool(case.descriptors and case.descriptors.values),
        )
        row.basis = basis.model_dump(mode="json", exclude_none=True)
        if provenance is None:
            return self._not_scored(row, basis, UNSTATED, kind="unstated")
        failures = evaluate(provenance, self.qc)
        if failures:
            why = "QC failed: " + "; ".join(f.text for f in failures)
            basis = basis.model_copy(update={"qc_failures": tuple(failures)})
            return self._not_scored(row, basis, why, kind="qc")
        try:
            prediction = self.runtime.get().predict(
                model_inputs(case), conventions=provenance.conventions
            )
        except SettingsMismatchError as exc:
            return self._not_scored(row, basis, str(exc), kind="mismatch")
        except (ValueError, RuntimeUnavailableError) as exc:
            # FeatureValidationError is a ValueError; keep the case, say why there is no estimate.
            row.error = str(exc)[:2000]
            log.warning(
                "prediction failed",
                extra={"result_id": result_id, "error_class": type(exc).__name__},
            )
            return self.store.save_prediction(row)
        features = {k: v for k, v in case.features.items() if v is not None}
        warnings = self._outside(prediction, provenance, case.features)
        if warnings:  # scored, but every view of it says the case is outside the training data
            basis = basis.model_copy(update={"ood_warnings": tuple(warnings)})
            row.basis = basis.model_dump(mode="json", exclude_none=True)
            OUT_OF_DISTRIBUTION.inc()
        row.prediction = json_safe(prediction.to_dict())
        row.probability = prediction.probability
        row.observation = build_observation(
            prediction=prediction,
            prediction_key=f"{result_id}/{row.card_uuid}",
            status=status.value,
            study_instance_uid=case.result.study_instance_uid,
            acquired_at=case.result.acquired_at,
            computed_at=row.computed_at,
            laterality=case.result.laterality,
            features=features,
            descriptors=case.descriptors.values if case.descriptors else {},
        )
        if warnings:
            notes = list(row.observation.get("note") or [])
            notes.append({"text": ood_text(warnings)})
            row.observation = {**row.observation, "note": notes}
        log.info(
            "prediction stored",
            extra={
                "result_id": result_id,
                "series_uid": case.result.series_instance_uid,
                "variant": prediction.variant.value,
                "model_version": prediction.model_version,
            },
        )
        return self.store.save_prediction(row)
