"""The AI-transparency FHIR resources beside the Observation, the imaging prefetch and write-back.

Each resource the card suggests (Observation, DiagnosticReport, Provenance, Device, model-card
DocumentReference) and the write-back transaction Bundle are checked against the official FHIR R4
JSON schema (scripts/fetch-fhir-schema.sh, as in test_cds_fhir.py), and their links are checked
by value: Provenance → Observation and Device, DiagnosticReport → Observation and ImagingStudy,
the model card's SHA-1 against its bytes. Write-back goes to the FHIR test server stand-in.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cds_support import (
    MASS_DESCRIPTORS,
    Service,
    her2_bundle,
    hook_body,
    patient_resource,
    result_payload,
    running_fhir_server,
    running_service,
    start_service,
    stop_service,
    walk_empty,
)

from cds_service.card_cache import CardTemplate
from cds_service.fhir_transparency import (
    transaction_bundle,
    variant_model_card,
)
from cds_service.orm import AuditEvent
from cds_service.prefetch import imaging_study_ids
from models.prediction import ModelVariant, Prediction
from tests.fhir_schema import validator

ROOT = Path(__file__).resolve().parents[1]
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"  # result_payload()'s study
TOKEN = "ehr-access-token"  # the FHIR test server's bearer token
KINDS = ["Observation", "DiagnosticReport", "Provenance", "Device", "DocumentReference"]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


@pytest.fixture
def fhir_server() -> Iterator[Any]:
    yield from running_fhir_server()


def schema_errors(resource: dict[str, Any]) -> list[str]:
    errors = sorted(
        validator(resource["resourceType"]).iter_errors(resource), key=lambda e: list(e.path)
    )
    return [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]


def _publish(service: Service, descriptors: bool = True) -> str:
    rid = str(service.publish(result_payload()).json()["result_id"])
    if descriptors:
        assert service.put_descriptors(rid, MASS_DESCRIPTORS).status_code == 200
    return rid


def _card(service: Service, **extra: Any) -> dict[str, Any]:
    prefetch = extra.pop("prefetch", {"patient": patient_resource(), "her2": her2_bundle()})
    response = service.post_hook(hook_body(prefetch=prefetch, **extra))
    assert response.status_code == 200, response.text
    assert walk_empty(response.json()) == []
    (card,) = response.json()["cards"]
    return dict(card)


def _resources(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (suggestion,) = card["suggestions"]
    actions = suggestion["actions"]
    assert [a["type"] for a in actions] == ["create"] * len(actions)
    assert all(a["description"] for a in actions)
    found = {a["resource"]["resourceType"]: a["resource"] for a in actions}
    assert list(found) == KINDS  # one create per resource, the Observation first
    return found


def _ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _imaging_study(pid: str = "pat-1", sid: str = "img-7") -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": sid,
        "status": "available",
        "subject": {"reference": f"Patient/{pid}"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
    }


def _auth() -> dict[str, Any]:
    return {
        "access_token": TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read patient/*.write",
        "subject": "her2low-cds",
    }


def _audit(service: Service, rid: str) -> list[AuditEvent]:
    return list(service.app.extensions["her2low_cds"].store.audit_for(rid))


def _writer(service: Service) -> Any:
    writer = service.app.extensions["her2low_cds"].writeback
    assert writer is not None
    return writer


# --- the resources ------------------------------------------------------------------------------


def test_each_resource_validates_against_fhir_r4_schema(service: Service) -> None:
    _publish(service)
    for kind, resource in _resources(_card(service)).items():
        assert schema_errors(resource) == [], kind
        assert walk_empty(resource) == [], kind


def test_schema_check_is_real(service: Service) -> None:
    _publish(service)
    found = _resources(_card(service))
    broken = copy.deepcopy(found["Provenance"])
    broken["recorded"] = "yesterday"
    assert schema_errors(broken)
    broken = copy.deepcopy(found["DocumentReference"])
    broken["content"][0]["attachment"]["size"] = "12"
    assert schema_errors(broken)


def test_provenance_targets_the_observation_and_names_the_device(service: Service) -> None:
    _publish(service)
    found = _resources(_card(service))
    obs, device, prov = found["Observation"], found["Device"], found["Provenance"]
    assert {"reference": _ref(obs)} in prov["target"]
    assert {"reference": _ref(found["DiagnosticReport"])} in prov["target"]
    (agent,) = prov["agent"]
    assert agent["who"]["reference"] == _ref(device)
    assert agent["role"][0]["coding"][0]["code"] == "Artificial-Intelligence"
    assert prov["reason"][0]["coding"][0]["code"] == "AIAST"
    study = [e for e in prov["entity"] if e["what"].get("type") == "ImagingStudy"]
    assert study[0]["what"]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{STUDY_UID}",
    }
    descriptors = [e for e in prov["entity"] if "agent" in e]
    assert descriptors[0]["agent"][0]["who"]["identifier"]["value"] == "dr-radiologist"
    card_entity = [e for e in prov["entity"] if e["role"] == "derivation"]
    assert card_entity[0]["what"]["reference"] == _ref(found["DocumentReference"])
    # the Device is the model that made the Observation
    assert device["identifier"][0]["value"] == obs["contained"][0]["identifier"][0]["value"]
    assert device["type"]["coding"][0]["code"] == "Artificial-Intelligence"
    model_card_ext = [e for e in device["extension"] if e["url"].endswith("modelCardDescription")]
    assert model_card_ext[0]["valueReference"]["reference"] == _ref(found["DocumentReference"])


def test_no_descriptor_author_without_descriptors(service: Service) -> None:
    _publish(service, descriptors=False)
    prov = _resources(_card(service))["Provenance"]
    assert not [e for e in prov["entity"] if "agent" in e]


def test_model_card_hash_matches_the_attachment_bytes(service: Service) -> None:
    _publish(service)
    doc = _resources(_card(service))["DocumentReference"]
    assert doc["type"]["coding"][0]["code"] == "AIModelCard"
    inline = [c["attachment"] for c in doc["content"] if "data" in c["attachment"]]
    assert inline, "no attachment carries the model card itself"
    for att in inline:
        data = base64.b64decode(att["data"])
        assert att["size"] == len(data)
        assert base64.b64decode(att["hash"]) == hashlib.sha1(data).digest()
        assert att["contentType"] == "text/markdown"
        assert "fake-her2low" in data.decode("utf-8")
        assert "Not clinically validated".lower() in data.decode("utf-8").lower()


def test_diagnostic_report_groups_the_observation_with_the_imaging_study(
    service: Service,
) -> None:
    _publish(service)
    found = _resources(_card(service))
    report, obs = found["DiagnosticReport"], found["Observation"]
    assert report["result"][0]["reference"] == _ref(obs)
    (study,) = report["imagingStudy"]
    assert study["identifier"]["value"] == f"urn:oid:{STUDY_UID}"
    assert "reference" not in study  # the EHR named no ImagingStudy
    assert report["subject"] == obs["subject"] == {"reference": "Patient/pat-1"}
    assert report["status"] == obs["status"] == "final"
    assert report["meta"]["security"][0]["code"] == "AIAST"
    assert "confirm HER2 status by IHC/ISH" in report["conclusion"]


def test_imaging_prefetch_names_the_ehr_imaging_study(service: Service) -> None:
    _publish(service)
    prefetch = {
        "patient": patient_resource(),
        "her2": None,
        "imaging": {"resourceType": "Bundle", "entry": [{"resource": _imaging_study()}]},
    }
    found = _resources(_card(service, prefetch=prefetch))
    assert found["DiagnosticReport"]["imagingStudy"][0]["reference"] == "ImagingStudy/img-7"
    assert found["Observation"]["derivedFrom"][0]["reference"] == "ImagingStudy/img-7"
    study = [e for e in found["Provenance"]["entity"] if e["what"].get("type") == "ImagingStudy"]
    assert study[0]["what"]["reference"] == "ImagingStudy/img-7"
    for resource in found.values():
        assert schema_errors(resource) == []


def test_imaging_prefetch_fetched_from_fhir_server_when_missing(
    service: Service, fhir_server: Any
) -> None:
    _publish(service)
    fhir_server.imaging_studies.append(_imaging_study())
    card = _card(
        service,
        prefetch={"patient": patient_resource(), "her2": None},
        fhirServer=fhir_server.url,
        fhirAuthorization=_auth(),
    )
    assert any(r.startswith("/fhir/ImagingStudy?patient=pat-1") for r in fhir_server.requests)
    found = _resources(card)
    assert found["DiagnosticReport"]["imagingStudy"][0]["reference"] == "ImagingStudy/img-7"


def test_imaging_study_ids_skips_clashes_and_other_systems() -> None:
    other = _imaging_study(sid="img-8")
    foreign = _imaging_study(sid="img-9")
    foreign["identifier"] = [{"system": "urn:other", "value": "urn:oid:1.2.3"}]
    bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": _imaging_study()}, {"resource": other}, {"resource": foreign}],
    }
    assert imaging_study_ids(bundle) == {}
    assert imaging_study_ids(_imaging_study()) == {STUDY_UID: "img-7"}
    assert imaging_study_ids(None) == {}
    ref = {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:9"}}
    body = CardTemplate({"derivedFrom": [ref]}).render({}, {STUDY_UID: "img-7"})
    assert json.loads(body)["cards"][0]["derivedFrom"] == [ref]  # another study: untouched


def test_transaction_bundle_uses_urn_uuid_and_conditional_creates(service: Service) -> None:
    _publish(service)
    found = _resources(_card(service))
    bundle = transaction_bundle(list(found.values()))
    assert schema_errors(bundle) == []
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    text = json.dumps(bundle)
    for resource in found.values():
        assert f"urn:uuid:{resource['id']}" in full_urls
        assert f'"{_ref(resource)}"' not in text  # every local reference rewritten
    by_kind = {e["resource"]["resourceType"]: e["request"] for e in bundle["entry"]}
    assert by_kind["Observation"]["ifNoneExist"].startswith("identifier=urn:her2low:prediction|")
    assert by_kind["Device"]["ifNoneExist"].startswith("identifier=urn:her2low:onnx-sha256|")
    assert "ifNoneExist" not in by_kind["Provenance"]  # R4 Provenance has no identifier
    assert all(r["method"] == "POST" for r in by_kind.values())


def test_variant_model_card_only_for_the_model_that_predicted() -> None:
    card_json = ROOT / "models/reference/her2low-reference/0.1.0/combined/card.json"
    card = json.loads(card_json.read_text())
    runtime = type("R", (), {"cards": {ModelVariant.COMBINED: card}})()
    fields: dict[str, Any] = {
        "probability": 0.6,
        "classes": ("zero", "low", "over"),
        "probabilities": (0.3, 0.6, 0.1),
        "threshold": 0.5,
        "model_name": card["name"],
        "model_version": card["version"],
        "variant": ModelVariant.COMBINED,
        "reference": True,
        "onnx_sha256": "0" * 64,
        "inputs_used": (),
        "inputs_missing": (),
        "contributions": (),
    }
    text = variant_model_card(runtime, Prediction(**fields))
    assert text is not None and card["name"] in text
    fields["model_version"] = "9.9"
    assert variant_model_card(runtime, Prediction(**fields)) is None


# --- write-back ---------------------------------------------------------------------------------


def test_write_back_posts_one_transaction(tmp_path: Path, fhir_server: Any) -> None:
    svc = start_service(tmp_path, cds_fhir_writeback=True)
    try:
        rid = _publish(svc)
        fhir_server.imaging_studies.append(_imaging_study())
        extra = {"fhirServer": fhir_server.url, "fhirAuthorization": _auth()}
        card = _card(svc, prefetch={"patient": patient_resource(), "her2": None}, **extra)
        assert _writer(svc).wait_idle(10)
        (bundle,) = fhir_server.transactions
        assert bundle["type"] == "transaction"
        assert schema_errors(bundle) == []
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert kinds == KINDS
        sent_obs = bundle["entry"][0]["resource"]
        assert sent_obs["subject"] == {"reference": "Patient/pat-1"}
        assert sent_obs["identifier"] == _resources(card)["Observation"]["identifier"]
        report = bundle["entry"][1]["resource"]
        assert report["imagingStudy"][0]["reference"] == "ImagingStudy/img-7"
        assert len(fhir_server.created) == 5
        (event,) = [e for e in _audit(svc, rid) if e.action.startswith("fhir-writeback")]
        assert event.action == "fhir-writeback-succeeded"
        assert event.detail["attempts"] == 1 and event.detail["card"] == card["uuid"]
        assert TOKEN not in json.dumps(event.detail)
        # the same card again: not re-sent (and a re-send would not duplicate: ifNoneExist)
        _card(svc, prefetch={"patient": patient_resource(), "her2": None}, **extra)
        assert _writer(svc).wait_idle(10)
        assert len(fhir_server.transactions) == 1
        # a new estimate by the same model: its Device and model card are already on file
        assert svc.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=False).status_code == 200
        _card(svc, prefetch={"patient": patient_resource(), "her2": None}, **extra)
        assert _writer(svc).wait_idle(10)
        assert len(fhir_server.transactions) == 2
        kinds = [r["resourceType"] for r in fhir_server.created]
        assert kinds.count("Device") == kinds.count("DocumentReference") == 1
        assert kinds.count("Observation") == kinds.count("Provenance") == 2
    finally:
        stop_service(svc)


def test_write_back_retries_then_succeeds(tmp_path: Path, fhir_server: Any) -> None:
    svc = start_service(tmp_path, cds_fhir_writeback=True)
    try:
        rid = _publish(svc)
        fhir_server.fail_transactions = 1
        _card(svc, fhirServer=fhir_server.url, fhirAuthorization=_auth())
        assert _writer(svc).wait_idle(15)
        assert len(fhir_server.transactions) == 2
        assert len(fhir_server.created) == 5
        (event,) = [e for e in _audit(svc, rid) if e.action.startswith("fhir-writeback")]
        assert event.action == "fhir-writeback-succeeded" and event.detail["attempts"] == 2
    finally:
        stop_service(svc)


def test_failing_fhir_server_does_not_break_or_slow_the_card(
    tmp_path: Path, fhir_server: Any
) -> None:
    svc = start_service(tmp_path, cds_fhir_writeback=True, cds_fhir_writeback_attempts=2)
    try:
        rid = _publish(svc)
        _card(svc)  # prepare (and cache) the card first: only the write-back path is timed
        fhir_server.fail_transactions = 100
        fhir_server.delay_seconds = 1.0  # every answer of the EHR's server is slow, too
        prefetch = {"patient": patient_resource(), "her2": None, "imaging": None}
        start = time.monotonic()
        card = _card(svc, prefetch=prefetch, fhirServer=fhir_server.url, fhirAuthorization=_auth())
        assert time.monotonic() - start < 0.9  # answered before the EHR's server even replied
        assert _resources(card)["Observation"]["subject"] == {"reference": "Patient/pat-1"}
        assert _writer(svc).wait_idle(20)
        assert len(fhir_server.transactions) == 2  # bounded retries
        (event,) = [e for e in _audit(svc, rid) if e.action.startswith("fhir-writeback")]
        assert event.action == "fhir-writeback-failed"
        assert event.detail["attempts"] == 2 and event.detail["status"] == 503
    finally:
        stop_service(svc)


def test_write_back_is_off_by_default(service: Service, fhir_server: Any) -> None:
    _publish(service)
    _card(service, fhirServer=fhir_server.url, fhirAuthorization=_auth())
    time.sleep(0.2)
    assert fhir_server.transactions == []
    assert service.app.extensions["her2low_cds"].writeback is None


def test_write_back_respects_the_fhir_server_allow_list(tmp_path: Path, fhir_server: Any) -> None:
    svc = start_service(
        tmp_path,
        cds_fhir_writeback=True,
        cds_fhir_server_allowlist=["https://fhir.hospital.example/"],
    )
    try:
        _publish(svc)
        prefetch = {"patient": patient_resource(), "her2": None, "imaging": None}
        _card(svc, prefetch=prefetch, fhirServer=fhir_server.url, fhirAuthorization=_auth())
        time.sleep(0.2)
        assert fhir_server.requests == []
    finally:
        stop_service(svc)


def test_write_back_refused_is_not_retried(tmp_path: Path, fhir_server: Any) -> None:
    svc = start_service(tmp_path, cds_fhir_writeback=True)
    try:
        rid = _publish(svc)
        auth = dict(_auth(), access_token="a-token-the-ehr-server-refuses")
        prefetch = {"patient": patient_resource(), "her2": None, "imaging": None}
        _card(svc, prefetch=prefetch, fhirServer=fhir_server.url, fhirAuthorization=auth)
        assert _writer(svc).wait_idle(10)
        assert fhir_server.requests.count("/fhir?") == 1  # 401: one attempt, no retry
        (event,) = [e for e in _audit(svc, rid) if e.action.startswith("fhir-writeback")]
        assert event.action == "fhir-writeback-failed"
        assert event.detail["status"] == 401 and event.detail["attempts"] == 1
        assert "a-token-the-ehr-server-refuses" not in json.dumps(event.detail)
    finally:
        stop_service(svc)
