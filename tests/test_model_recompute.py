"""Re-scoring stored cases when another model version is deployed (issue 13): a background job
at start re-scores what an older version scored, audits it, and the case shows the new version."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from test_cds_support import (
    FakePredictor,
    ReviewClient,
    result_payload,
    start_service,
    stop_service,
)

from cds_service.app import RECOMPUTE_KEY
from cds_service.audit import AuditAction
from cds_service.recompute import ModelIdentity
from cds_service.store import AuditQuery
from models.contract import AnalysisConventions
from models.prediction import Prediction


class VersionedPredictor(FakePredictor):
    """The fake model under a given version (what a new registry version looks like)."""

    model_name = "fake-her2low"

    def __init__(self, version: str) -> None:
        super().__init__()
        self.model_version = version

    def predict(
        self,
        inputs: Mapping[str, str | float | None],
        *,
        conventions: AnalysisConventions | None = None,
    ) -> Prediction:
        prediction = super().predict(inputs, conventions=conventions)
        return dataclasses.replace(prediction, model_version=self.model_version)


def _versions(store: Any) -> dict[str, str | None]:
    out = {}
    for rid, prediction in store.latest_predictions():
        found = ModelIdentity.of_prediction(prediction)
        out[rid] = found.version if found else None
    return out


def _wait(app: Any) -> Any:
    job = app.extensions[RECOMPUTE_KEY]
    assert job.done.wait(30), "the re-scoring job did not finish"
    return job


def test_new_version_rescores_stored_cases(tmp_path: Path) -> None:
    old = start_service(tmp_path, predictor=VersionedPredictor("1.0"))
    try:
        ids = [
            old.publish(result_payload(patient_id=f"MRN-R{k}")).json()["result_id"]
            for k in range(3)
        ]
        assert _wait(old.app).recomputed == 0
        assert set(_versions(old.app.extensions["her2low_cds"].store).values()) == {"1.0"}
    finally:
        stop_service(old)

    new_model = VersionedPredictor("2.0")
    new = start_service(tmp_path, predictor=new_model)
    try:
        job = _wait(new.app)
        store = new.app.extensions["her2low_cds"].store
        assert job.recomputed == 3
        assert new_model.calls == 3
        assert _versions(store) == {rid: "2.0" for rid in ids}
        events = store.audit_events(AuditQuery(action=AuditAction.PREDICTIONS_RECOMPUTED))
        assert {e.result_id for e in events} == set(ids)
        assert all(
            e.detail == {"from": "fake-her2low 1.0", "to": "fake-her2low 2.0"} for e in events
        )
        assert all(e.actor == "cds-service" for e in events)
        page = ReviewClient(new, "oncologist").get(f"{new.url}/review/cases/{ids[0]}")
        assert "fake-her2low 2.0" in page.text
    finally:
        stop_service(new)

    same = start_service(tmp_path, predictor=VersionedPredictor("2.0"))
    try:
        assert _wait(same.app).recomputed == 0  # nothing scored by another version
    finally:
        stop_service(same)


def test_switched_off(tmp_path: Path) -> None:
    old = start_service(tmp_path, predictor=VersionedPredictor("1.0"))
    try:
        rid = old.publish(result_payload()).json()["result_id"]
    finally:
        stop_service(old)
    new = start_service(
        tmp_path, predictor=VersionedPredictor("2.0"), cds_recompute_on_model_change=False
    )
    try:
        assert RECOMPUTE_KEY not in new.app.extensions
        assert _versions(new.app.extensions["her2low_cds"].store) == {rid: "1.0"}
    finally:
        stop_service(new)


def test_reference_runtime_identity() -> None:
    from models.runtime import ModelRuntime

    identity = ModelIdentity.of_runtime(ModelRuntime.load(None))
    assert identity is not None and identity.name == "her2low-reference"
    assert ModelIdentity.of_runtime(FakePredictor()) is None  # a model that does not say
