"""End to end with the real model runtime (models.runtime.ModelRuntime, the shipped reference
model): results API → prediction → patient-view card → Observation valid against FHIR R4.

The service's default (``runtime=None``) loads ``ModelRuntime.load(settings.model_dir)`` lazily;
these tests use that path, not an injected predictor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from test_cds_fhir import fhir_validator
from test_cds_support import (
    FULL_FEATURES,
    MASS_DESCRIPTORS,
    RESULTS_TOKEN,
    ReviewClient,
    her2_bundle,
    hook_body,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
    walk_empty,
)

pytest.importorskip("models.runtime", reason="models.runtime has not landed yet")


def test_real_runtime_end_to_end(tmp_path: Path) -> None:
    svc = start_service(tmp_path, predictor=None)
    try:
        body: dict[str, Any] = result_payload()
        body["features"] = FULL_FEATURES
        created = svc.publish(body)
        assert created.status_code == 201, created.text
        rid = created.json()["result_id"]
        case = requests.get(
            f"{svc.url}/api/v1/cases/{rid}",
            headers={"Authorization": f"Bearer {RESULTS_TOKEN}"},
            timeout=10,
        ).json()
        assert case["prediction"] is not None
        first = case["prediction"]
        put = svc.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=True)
        assert put.status_code == 200, put.text
        second = put.json()["prediction"]
        assert second["error"] is None, second
        assert second["variant"] == "combined"
        assert second["computed_at"] != first["computed_at"]
        response = svc.post_hook(
            hook_body(prefetch={"patient": patient_resource(), "her2": her2_bundle(text="0")})
        )
        assert response.status_code == 200, response.text
        assert walk_empty(response.json()) == []
        (card,) = response.json()["cards"]
        assert "confirm HER2 status by IHC/ISH" in card["detail"]
        observation = card["suggestions"][0]["actions"][0]["resource"]
        errors = list(fhir_validator().iter_errors(observation))
        assert not errors, [e.message[:200] for e in errors[:5]]
        assert observation["status"] == "final"
        board = ReviewClient(svc, "oncologist")
        page = board.get(f"{svc.url}/review/cases/{rid}")
        assert page.status_code == 200
        card_page = board.get(f"{svc.url}/review/model-card")
        assert card_page.status_code == 200
        assert observation["contained"][0]["deviceName"][0]["name"] in card_page.text
    finally:
        stop_service(svc)


def _descriptor_sets() -> list[dict[str, str]]:
    sets = []
    for shape in ("oval", "round", "irregular"):
        for margin in ("circumscribed", "irregular", "spiculated"):
            for t2 in ("yes", "no"):
                sets.append(
                    {
                        "lesion_type": "mass",
                        "mass_shape": shape,
                        "mass_margin": margin,
                        "mass_internal_enhancement": "heterogeneous",
                        "t2_hyperintensity": t2,
                        "peritumoral_edema": "no",
                    }
                )
    return sets


def test_real_runtime_discordance_warning_and_info(tmp_path: Path) -> None:
    """With the reference model: biopsy HER2 0 + estimate >= threshold → warning, else info."""
    from models.runtime import ModelRuntime

    runtime = ModelRuntime.load(None)
    scored = []
    for values in _descriptor_sets():
        p = runtime.predict({**FULL_FEATURES, **values})
        scored.append((p.probability - p.threshold, values))
    scored.sort(key=lambda x: x[0])
    below, above = scored[0], scored[-1]
    assert below[0] < 0 <= above[0], "the reference model should span its threshold"
    svc = start_service(tmp_path, predictor=None)
    try:
        for margin, values, indicator in (
            (above[0], above[1], "warning"),
            (below[0], below[1], "info"),
        ):
            body: dict[str, Any] = result_payload(patient_id=f"MRN-{indicator}")
            body["features"] = FULL_FEATURES
            rid = svc.publish(body).json()["result_id"]
            assert svc.put_descriptors(rid, values).status_code == 200
            patient = patient_resource(pid=f"p-{indicator}", mrn=f"MRN-{indicator}")
            prefetch = {"patient": patient, "her2": her2_bundle(pid=f"p-{indicator}", text="0")}
            response = svc.post_hook(hook_body(pid=f"p-{indicator}", prefetch=prefetch))
            (card,) = response.json()["cards"]
            assert card["indicator"] == indicator, (margin, card["summary"])
    finally:
        stop_service(svc)
