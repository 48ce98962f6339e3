"""CDS Hooks 2.0.1 behaviour over real HTTP: discovery, patient-view, prefetch, feedback, CORS,
errors. The FHIR server used for partial prefetch is tests/fhir_test_server.py, a stand-in for
an EHR's FHIR server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select
from test_cds_support import (
    MASS_DESCRIPTORS,
    SERVICE_PATH,
    ReviewClient,
    Service,
    her2_bundle,
    hook_body,
    is_operation_outcome,
    issued_card,
    patient_resource,
    result_payload,
    running_fhir_server,
    running_service,
    start_service,
    stop_service,
    walk_empty,
)

from cds_service.orm import Feedback


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


@pytest.fixture
def fhir_server() -> Iterator[Any]:
    yield from running_fhir_server()


def _published(svc: Service, **kwargs: Any) -> str:
    response = svc.publish(result_payload(**kwargs))
    assert response.status_code == 201, response.text
    return str(response.json()["result_id"])


def _cards(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert walk_empty(response.json()) == []
    return list(response.json()["cards"])


# --- discovery -------------------------------------------------------------------------------


def test_discovery(service: Service) -> None:
    response = requests.get(
        service.url + "/cds-services", headers=service.auth("/cds-services"), timeout=10
    )
    assert response.status_code == 200
    (svc,) = response.json()["services"]
    assert svc["id"] == "her2low-mri" and svc["hook"] == "patient-view"
    assert svc["title"] and svc["description"]
    assert svc["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert svc["prefetch"]["her2"].startswith("Observation?patient={{context.patientId}}&code=")
    for code in ("48676-1", "85319-2", "18474-7", "85318-4"):
        assert f"http://loinc.org|{code}" in svc["prefetch"]["her2"]
    assert svc["prefetch"]["imaging"].startswith(
        "ImagingStudy?patient={{context.patientId}}&modality="
    )
    assert walk_empty(response.json()) == []


# --- patient-view ----------------------------------------------------------------------------


def test_no_result_no_cards(service: Service) -> None:
    cards = _cards(
        service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    )
    assert cards == []


def test_unknown_patient_null_prefetch_no_cards(service: Service) -> None:
    _published(service)
    assert _cards(service.post_hook(hook_body(prefetch={"patient": None}))) == []


def test_card_with_prefetch_present(service: Service) -> None:
    rid = _published(service)
    assert service.put_descriptors(rid, MASS_DESCRIPTORS).status_code == 200
    body = hook_body(prefetch={"patient": patient_resource(), "her2": her2_bundle(text="1+")})
    (card,) = _cards(service.post_hook(body))
    assert len(card["summary"]) < 140
    assert card["indicator"] == "info"
    uuid.UUID(card["uuid"])
    detail = card["detail"]
    for phrase in (
        "Statistical estimate — confirm HER2 status by IHC/ISH",
        "reference model, not clinically validated",
        "Inputs used:",
        "Largest contributions",
        "Tumour ROI:",
        "QC flags:",
        "MRI acquired 2026-11-25",
        "fake-her2low 0.0-test",
        "combined model",
    ):
        assert phrase in detail, phrase
    assert card["selectionBehavior"] == "at-most-one"
    (suggestion,) = card["suggestions"]
    uuid.UUID(suggestion["uuid"])
    action = suggestion["actions"][0]  # the Observation; its AI-transparency companions follow
    assert {a["type"] for a in suggestion["actions"]} == {"create"}
    assert [a["resource"]["resourceType"] for a in suggestion["actions"][1:]] == [
        "DiagnosticReport",
        "Provenance",
        "Device",
        "DocumentReference",
    ]
    observation = action["resource"]
    assert observation["resourceType"] == "Observation"
    assert observation["subject"] == {"reference": "Patient/pat-1"}
    assert observation["status"] == "final"  # descriptors + ROI confirmed
    assert all(r["display"] for r in card["overrideReasons"])
    (link,) = card["links"]
    assert link["type"] == "absolute" and link["url"] == f"{service.url}/review/cases/{rid}"
    assert card["source"]["label"]


def test_discordance_is_a_warning(service: Service) -> None:
    rid = _published(service, adc_mean=0.0007)  # low ADC → high likelihood in the fake model
    service.put_descriptors(rid, MASS_DESCRIPTORS)
    body = hook_body(
        prefetch={"patient": patient_resource(), "her2": her2_bundle(text="Negative (0)")}
    )
    (card,) = _cards(service.post_hook(body))
    assert card["indicator"] == "warning"
    assert "HER2 0" in card["summary"] and len(card["summary"]) < 140
    # the review worklist shows the discordance flag afterwards
    page = ReviewClient(service, "oncologist").get(service.url + "/review/").text
    assert "biopsy HER2 0 vs MRI HER2-low" in page


@pytest.mark.parametrize(
    "observation",
    [
        {"valueString": "0"},
        {
            "valueCodeableConcept": {
                "coding": [{"system": "http://loinc.org", "display": "Score 0"}]
            }
        },
        {"valueString": "IHC 0"},
        {"interpretation": [{"text": "0 (negative)"}], "valueString": "see report"},
        {"valueQuantity": {"value": 0}},
    ],
)
def test_her2_zero_forms_recognised(observation: dict[str, Any]) -> None:
    from cds_service.biopsy import BiopsyHer2, latest_reading

    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "48676-1"}]},
        **observation,
    }
    assert (
        latest_reading({"resourceType": "Bundle", "entry": [{"resource": obs}]}).status
        is BiopsyHer2.ZERO
    )


@pytest.mark.parametrize("text", ["Negative", "1+", "Positive (3+)", "Equivocal (2+)"])
def test_her2_not_zero(text: str) -> None:
    from cds_service.biopsy import BiopsyHer2, latest_reading

    bundle = her2_bundle(text=text)
    assert latest_reading(bundle).status is BiopsyHer2.OTHER


def test_below_threshold_with_her2_zero_is_info(service: Service) -> None:
    _published(service, adc_mean=0.0016)  # high ADC → low likelihood
    body = hook_body(prefetch={"patient": patient_resource(), "her2": her2_bundle(text="0")})
    (card,) = _cards(service.post_hook(body))
    assert card["indicator"] == "info"


def test_descriptors_missing_card_links_to_form(service: Service) -> None:
    rid = _published(service)
    (card,) = _cards(
        service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    )
    assert "quantitative-only model" in card["detail"]
    assert f"{service.url}/review/cases/{rid}#descriptors" in card["detail"]


def test_descriptors_needed_card_when_runtime_gives_nothing(tmp_path: Path) -> None:
    class NoQuantitative:
        def predict(self, inputs: Any, *, conventions: Any = None) -> Any:
            raise ValueError("lesion_type: descriptors required by this model")

    svc = start_service(tmp_path, predictor=NoQuantitative())
    try:
        rid = _published(svc)
        (card,) = _cards(
            svc.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
        )
        assert "descriptors needed" in card["summary"]
        assert card["links"][0]["url"] == f"{svc.url}/review/cases/{rid}#descriptors"
        assert "suggestions" not in card
    finally:
        stop_service(svc)


def test_match_by_identifier_never_by_name(service: Service) -> None:
    _published(service, patient_id="MRN-1")
    other = patient_resource(mrn="MRN-2")
    other["name"] = [{"family": "Test"}]
    assert _cards(service.post_hook(hook_body(prefetch={"patient": other, "her2": None}))) == []
    wrong_system = patient_resource(system="urn:other")
    assert (
        _cards(service.post_hook(hook_body(prefetch={"patient": wrong_system, "her2": None}))) == []
    )


def test_ambiguous_identity_holds_the_case(service: Service) -> None:
    rid = _published(service, patient_id="MRN-1")
    _published(service, patient_id="MRN-9")
    patient = patient_resource()
    patient["identifier"].append({"system": patient["identifier"][0]["system"], "value": "MRN-9"})
    assert _cards(service.post_hook(hook_body(prefetch={"patient": patient, "her2": None}))) == []
    case = requests.get(
        f"{service.url}/api/v1/cases/{rid}",
        headers={"Authorization": "Bearer results-token-for-tests-0123456789"},
        timeout=10,
    ).json()
    assert case["review_flag"] == "identity-ambiguous"
    # once held, the case is not shown even to an unambiguous Patient
    assert (
        _cards(service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None})))
        == []
    )


def test_prefetch_patient_mismatch_is_400(service: Service) -> None:
    response = service.post_hook(
        hook_body(prefetch={"patient": patient_resource(pid="someone-else")})
    )
    assert response.status_code == 400 and is_operation_outcome(response)


def test_partial_prefetch_fetched_from_fhir_server(service: Service, fhir_server: Any) -> None:
    _published(service, adc_mean=0.0007)
    fhir_server.patients["pat-1"] = patient_resource()
    fhir_server.observations.append(her2_bundle(text="0")["entry"][0]["resource"])  # type: ignore[index]
    body = hook_body(
        prefetch={"patient": patient_resource()},  # her2 omitted → fetched
        fhirServer=fhir_server.url,
        fhirAuthorization={
            "access_token": "ehr-access-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Observation.read patient/Patient.read",
            "subject": "her2low-cds",
        },
    )
    (card,) = _cards(service.post_hook(body))
    assert card["indicator"] == "warning"
    assert any(r.startswith("/fhir/Observation?patient=pat-1") for r in fhir_server.requests)
    assert not any(r.startswith("/fhir/Patient") for r in fhir_server.requests)


def test_prefetch_operation_outcome_is_refetched(service: Service, fhir_server: Any) -> None:
    _published(service)
    fhir_server.patients["pat-1"] = patient_resource()
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "forbidden"}],
    }
    body = hook_body(
        prefetch={"patient": outcome, "her2": None},
        fhirServer=fhir_server.url,
        fhirAuthorization={
            "access_token": "ehr-access-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read",
            "subject": "her2low-cds",
        },
    )
    assert len(_cards(service.post_hook(body))) == 1
    assert (
        "/fhir/Patient/pat-1?" in fhir_server.requests
        or "/fhir/Patient/pat-1" in fhir_server.requests[0]
    )


def test_absent_prefetch_without_fhir_access_is_412(service: Service) -> None:
    response = service.post_hook(hook_body())
    assert response.status_code == 412 and is_operation_outcome(response)


def test_fhir_server_refuses_token_is_412(service: Service, fhir_server: Any) -> None:
    body = hook_body(
        fhirServer=fhir_server.url,
        fhirAuthorization={
            "access_token": "wrong",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read",
            "subject": "her2low-cds",
        },
    )
    response = service.post_hook(body)
    assert response.status_code == 412 and is_operation_outcome(response)


def test_no_null_or_empty_values_anywhere(service: Service) -> None:
    rid = _published(service, laterality=None)
    service.put_descriptors(
        rid, {"lesion_type": "nme", "nme_distribution": "segmental"}, confirmed=False
    )
    for her2 in (None, her2_bundle(text="0"), her2_bundle(text="2+")):
        prefetch: dict[str, Any] = {"patient": patient_resource()}
        if her2 is not None:
            prefetch["her2"] = her2
        else:
            prefetch["her2"] = None
        response = service.post_hook(hook_body(prefetch=prefetch))
        assert response.status_code == 200
        assert walk_empty(response.json()) == []
        assert response.json()["cards"]


# --- errors ----------------------------------------------------------------------------------


def test_bad_json_400(service: Service) -> None:
    response = requests.post(
        service.url + SERVICE_PATH,
        data=b"{not json",
        headers={**service.auth(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400 and is_operation_outcome(response)


def test_wrong_content_type_415(service: Service) -> None:
    response = requests.post(
        service.url + SERVICE_PATH,
        data=b"hook=patient-view",
        headers={**service.auth(), "Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert response.status_code == 415 and is_operation_outcome(response)


def test_unknown_service_404(service: Service) -> None:
    path = "/cds-services/no-such-service"
    response = requests.post(
        service.url + path, json=hook_body(), headers=service.auth(path), timeout=10
    )
    assert response.status_code == 404 and is_operation_outcome(response)


def test_unknown_path_404_is_json(service: Service) -> None:
    response = requests.get(service.url + "/nowhere", timeout=10)
    assert response.status_code == 404 and is_operation_outcome(response)


def test_wrong_method_405(service: Service) -> None:
    response = requests.get(service.url + SERVICE_PATH, headers=service.auth(), timeout=10)
    assert response.status_code == 405 and is_operation_outcome(response)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    ("mutate", "expression"),
    [
        (lambda b: b["context"].pop("patientId"), "context.patientId"),
        (lambda b: b["context"].pop("userId"), "context.userId"),
        (lambda b: b.update(hook="order-sign"), "hook"),
        (lambda b: b.update(hookInstance="not-a-uuid"), "hookInstance"),
        (lambda b: b.update(context="pat-1"), "context"),
        (lambda b: b.update(fhirAuthorization={"access_token": "x"}), "fhirAuthorization"),
    ],
)
def test_bad_request_400_names_the_field(service: Service, mutate: Any, expression: str) -> None:
    body = hook_body(prefetch={"patient": patient_resource()})
    mutate(body)
    response = service.post_hook(body)
    assert response.status_code == 400 and is_operation_outcome(response)
    issue = response.json()["issue"][0]
    assert issue["expression"][0].startswith(expression)


def test_body_not_an_object_400(service: Service) -> None:
    response = service.post_hook([1, 2])
    assert response.status_code == 400 and is_operation_outcome(response)


# --- CORS ------------------------------------------------------------------------------------


def test_cors_preflight_without_auth(service: Service) -> None:
    response = requests.options(
        service.url + SERVICE_PATH,
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
        allow_redirects=False,
    )
    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_cors_on_actual_responses_and_errors(service: Service) -> None:
    origin = {"Origin": "https://sandbox.cds-hooks.org"}
    ok = requests.get(
        service.url + "/cds-services",
        headers={**service.auth("/cds-services"), **origin},
        timeout=10,
    )
    assert ok.headers["Access-Control-Allow-Origin"] == "*"
    refused = requests.get(service.url + "/cds-services", headers=origin, timeout=10)
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_allow_list(tmp_path: Path) -> None:
    svc = start_service(tmp_path, cds_cors_origins=["https://ehr.example.test"])
    try:
        good = requests.options(
            svc.url + "/cds-services", headers={"Origin": "https://ehr.example.test"}, timeout=10
        )
        assert good.headers["Access-Control-Allow-Origin"] == "https://ehr.example.test"
        bad = requests.options(
            svc.url + "/cds-services", headers={"Origin": "https://evil.example.test"}, timeout=10
        )
        assert "Access-Control-Allow-Origin" not in bad.headers
    finally:
        stop_service(svc)


# --- feedback --------------------------------------------------------------------------------


def test_feedback_idempotent_and_shown_on_review_page(service: Service) -> None:
    rid = _published(service)
    (card,) = _cards(
        service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    )
    path = SERVICE_PATH + "/feedback"
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": card["overrideReasons"][0],
                    "userComment": "IHC repeated last week",
                },
                "outcomeTimestamp": "2026-11-25T11:00:00Z",
            },
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2026-11-25T11:05:00Z",
            },
        ]
    }
    first = requests.post(service.url + path, json=body, headers=service.auth(path), timeout=10)
    assert first.status_code == 200 and first.json() == {"stored": 2, "repeats": 0}
    again = requests.post(service.url + path, json=body, headers=service.auth(path), timeout=10)
    assert again.status_code == 200 and again.json() == {"stored": 0, "repeats": 2}
    page = ReviewClient(service, "oncologist").get(f"{service.url}/review/cases/{rid}").text
    assert "IHC repeated last week" in page and "accepted" in page
    assert len(service.app.extensions["her2low_cds"].store.feedback_for(rid)) == 2


def test_feedback_flat_override_reason_parsed_leniently(service: Service) -> None:
    path = SERVICE_PATH + "/feedback"
    body = {
        "feedback": [
            {
                "card": issued_card(service)["uuid"],
                "outcome": "overridden",
                "overrideReason": {"code": "disagree", "system": "urn:her2low:override-reason"},
                "outcomeTimestamp": "2026-11-25T11:00:00Z",
            }
        ]
    }
    response = requests.post(service.url + path, json=body, headers=service.auth(path), timeout=10)
    assert response.status_code == 200 and response.json()["stored"] == 1


def test_feedback_bad_outcome_400(service: Service) -> None:
    path = SERVICE_PATH + "/feedback"
    body = {
        "feedback": [{"card": "x", "outcome": "maybe", "outcomeTimestamp": "2026-11-25T11:00:00Z"}]
    }
    response = requests.post(service.url + path, json=body, headers=service.auth(path), timeout=10)
    assert response.status_code == 400 and is_operation_outcome(response)


def test_feedback_for_a_card_never_issued_refused_and_not_stored(service: Service) -> None:
    """A made-up card id is refused (422 naming it); the whole batch is stored or nothing."""
    card = issued_card(service)
    path = SERVICE_PATH + "/feedback"
    real = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-25T11:00:00Z"}
    made_up = {**real, "card": str(uuid.uuid4())}
    response = requests.post(
        service.url + path,
        json={"feedback": [real, made_up]},
        headers=service.auth(path),
        timeout=10,
    )
    assert response.status_code == 422 and is_operation_outcome(response), response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "not-found" and issue["expression"] == ["feedback.1.card"]
    st = service.app.extensions["her2low_cds"]
    with st.store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Feedback)) == 0
    # the real one alone is stored
    alone = requests.post(
        service.url + path, json={"feedback": [real]}, headers=service.auth(path), timeout=10
    )
    assert alone.status_code == 200 and alone.json() == {"stored": 1, "repeats": 0}


def test_fhir_server_allow_list(tmp_path: Path, fhir_server: Any) -> None:
    """SSRF guard: a fhirServer outside HER2LOW_CDS_FHIR_SERVER_ALLOWLIST is never contacted."""
    svc = start_service(tmp_path, cds_fhir_server_allowlist=["https://fhir.hospital.example/"])
    try:
        body = hook_body(fhirServer=fhir_server.url)
        response = svc.post_hook(body)
        assert response.status_code == 412 and is_operation_outcome(response)
        assert fhir_server.requests == []
    finally:
        stop_service(svc)
