"""Results API (docs/results-api.md), descriptors API and the review pages, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_cds_support import (
    MASS_DESCRIPTORS,
    RESULTS_TOKEN,
    ReviewClient,
    Service,
    is_operation_outcome,
    result_payload,
    running_service,
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


AUTH = {"Authorization": f"Bearer {RESULTS_TOKEN}"}


def test_created_unchanged_updated(service: Service) -> None:
    body = result_payload(series="1.2.3.4.100")
    first = service.publish(body)
    assert first.status_code == 201 and first.json()["status"] == "created"
    rid = first.json()["result_id"]
    assert service.predictor is not None and service.predictor.calls == 1
    # byte-identical (and key-order-insensitive) re-publish
    reordered = json.loads(json.dumps(body, sort_keys=True))
    again = service.publish(reordered)
    assert again.status_code == 200 and again.json() == {"result_id": rid, "status": "unchanged"}
    assert service.predictor.calls == 1  # nothing recomputed
    changed = dict(body, features={**body["features"], "adc_mean": 0.0008})
    updated = service.publish(changed)
    assert updated.status_code == 200 and updated.json() == {"result_id": rid, "status": "updated"}
    assert service.predictor.calls == 2
    listing = requests.get(
        service.url + "/api/v1/results",
        params={"study_instance_uid": body["study_instance_uid"]},
        headers=AUTH,
        timeout=10,
    ).json()["results"]
    (row,) = listing
    assert row["revision"] == 2 and row["prediction"]["probability"] > 0
    # another pipeline version (here an older node's dki-1) is a separate result, never mixed
    assert body["pipeline_version"] == "dki-2"
    other = service.publish(dict(body, pipeline_version="dki-1"))
    assert other.status_code == 201 and other.json()["result_id"] != rid


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + RESULTS_TOKEN, "Bearer "])
def test_results_auth(service: Service, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = requests.post(
        service.url + "/api/v1/results", json=result_payload(), headers=headers, timeout=10
    )
    assert response.status_code == 401 and is_operation_outcome(response)
    listing = requests.get(service.url + "/api/v1/results", headers=headers, timeout=10)
    assert listing.status_code == 401


def test_results_bad_json_and_content_type(service: Service) -> None:
    bad = requests.post(
        service.url + "/api/v1/results",
        data=b"{",
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 400 and is_operation_outcome(bad)
    nan = requests.post(
        service.url + "/api/v1/results",
        data=b'{"api_version": NaN}',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert nan.status_code == 400
    text = requests.post(
        service.url + "/api/v1/results",
        data=b"x",
        headers={**AUTH, "Content-Type": "text/plain"},
        timeout=10,
    )
    assert text.status_code == 415 and is_operation_outcome(text)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"api_version": 2}, "api_version"),
        ({"study_instance_uid": "not-a-uid"}, "study_instance_uid"),
        ({"laterality": "X"}, "laterality"),
        ({"acquired_at": "yesterday"}, "acquired_at"),
        ({"features": {"adc_mean": 1.2}}, "features"),
        ({"features": {"bogus_feature": 1.0}}, "features"),
        ({"patient": {"issuer": "HOSP"}}, "patient.id"),
        ({"previews": {"x": "not base64!"}}, "previews"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_results_schema_violation_422_names_field(
    service: Service, change: dict[str, Any], field: str
) -> None:
    body = result_payload()
    body.update(change)
    response = service.publish(body)
    assert response.status_code == 422 and is_operation_outcome(response)
    issue = response.json()["issue"][0]
    assert field in issue["diagnostics"]


def test_descriptors_api_recomputes_prediction(service: Service) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    before = requests.get(f"{service.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    assert before["prediction"]["variant"] == "quantitative"
    assert before["prediction"]["observation_status"] == "preliminary"
    response = service.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=True)
    assert response.status_code == 200, response.text
    after = response.json()
    assert after["descriptors_version"] == 1
    assert after["prediction"]["variant"] == "combined"
    assert after["prediction"]["observation_status"] == "final"
    assert after["prediction"]["probability"] != before["prediction"]["probability"]


@pytest.mark.parametrize(
    ("values", "feature"),
    [
        ({"lesion_type": "blob"}, "lesion_type"),
        ({"lesion_type": "nme", "mass_shape": "oval"}, "mass_shape"),
        ({"not_a_descriptor": "x"}, "not_a_descriptor"),
    ],
)
def test_descriptors_api_validation(service: Service, values: dict[str, Any], feature: str) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    response = service.put_descriptors(rid, values)
    assert response.status_code == 422 and is_operation_outcome(response)
    assert response.json()["issue"][0]["expression"] == [f"values.{feature}"]


def test_descriptors_unknown_case_404(service: Service) -> None:
    response = service.put_descriptors("no-such-case", MASS_DESCRIPTORS)
    assert response.status_code == 404 and is_operation_outcome(response)


# --- review pages ----------------------------------------------------------------------------


def test_worklist_and_case_page(service: Service) -> None:
    rid = service.publish(result_payload(previews=True)).json()["result_id"]
    board = ReviewClient(service, "radiologist")  # sees the descriptor form too
    worklist = board.get(service.url + "/review/")
    assert worklist.status_code == 200 and "text/html" in worklist.headers["Content-Type"]
    assert "reference model, not clinically validated" in worklist.text.lower()
    assert rid in worklist.text and "fake-her2low" in worklist.text
    assert board.get(service.url + "/review", allow_redirects=False).status_code == 200
    page = board.get(f"{service.url}/review/cases/{rid}")
    assert page.status_code == 200
    for text in (
        "ADC mean",
        "Tumour ROI",
        "at_bound: 3",
        "Reference model, not clinically validated",
        "/previews/dwi_b800.png",  # images are served from their own URL (review/case.py)
        "Model card",
        'name="lesion_type"',
        "Contribution",
        # the features table, typeset (dapp_mean is not among the fake contributions)
        "<td>Dapp mean</td><td>1.2 ×10⁻³ mm²/s</td>",
    ):
        assert text in page.text, text
    assert board.get(service.url + "/review/model-card").status_code == 200
    missing = board.get(service.url + "/review/cases/nope")
    assert missing.status_code == 404 and is_operation_outcome(missing)


def test_review_form_invalid_keeps_values(service: Service) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    form = {"lesion_type": "nme", "mass_shape": "irregular", "roi_confirmed": "yes"}
    response = ReviewClient(service).post(f"{service.url}/review/cases/{rid}/descriptors", form)
    assert response.status_code == 422
    assert "not saved" in response.text and "Mass shape" in response.text
    assert '<option value="irregular" selected>' in response.text  # nothing lost
    assert 'name="roi_confirmed" value="yes" checked' in response.text


def test_review_form_partial_needs_confirmation(service: Service) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    form = {"lesion_type": "mass", "mass_shape": "irregular"}
    radiologist = ReviewClient(service, "radiologist", "dr-a")
    url = f"{service.url}/review/cases/{rid}/descriptors"
    partial = radiologist.post(url, form)
    assert partial.status_code == 422 and "Not entered: Mass margin" in partial.text
    assert '<option value="irregular" selected>' in partial.text
    form["allow_partial"] = "yes"
    saved = radiologist.post(url, form, allow_redirects=False)
    assert saved.status_code == 303
    page = radiologist.get(service.url + saved.headers["Location"])
    assert "Descriptors saved" in page.text and "Version 1 entered by dr-a" in page.text
    case = requests.get(f"{service.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    assert case["prediction"]["variant"] == "combined"
    assert case["prediction"]["observation_status"] == "preliminary"  # ROI not confirmed


def test_review_form_anonymous_forged_and_cross_site(service: Service) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    url = f"{service.url}/review/cases/{rid}/descriptors"
    form = dict(MASS_DESCRIPTORS)
    anonymous = requests.post(url, data=form, timeout=10, allow_redirects=False)
    assert anonymous.status_code == 400  # no CSRF token, no session
    radiologist = ReviewClient(service, "radiologist", "dr-a")
    forged = radiologist.post(url, {**form, "entered_by": "dr-someone-else"}, allow_redirects=False)
    assert forged.status_code == 303
    page = radiologist.get(f"{service.url}/review/cases/{rid}").text
    assert "entered by dr-a" in page and "dr-someone-else" not in page  # the session decides
    cross = radiologist.post(url, form, headers={"Origin": "https://evil.example.test"})
    assert cross.status_code == 403


def test_board_decision_amends_then_withdraws_the_observation(service: Service) -> None:
    from test_cds_support import hook_body, patient_resource

    rid = service.publish(result_payload()).json()["result_id"]
    service.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=True)
    url = f"{service.url}/review/cases/{rid}/decision"
    board = ReviewClient(service, "oncologist", "dr-board")
    incomplete = board.post(url, {"decision": "amend", "comment": "keep me"})
    assert incomplete.status_code == 422
    assert (
        "Reason: choose a coded reason" in incomplete.text and 'value="keep me"' in incomplete.text
    )
    form = {"decision": "amend", "reason": "descriptors-corrected"}
    assert board.post(url, form, allow_redirects=False).status_code == 303
    case = requests.get(f"{service.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    assert case["prediction"]["observation_status"] == "amended"
    body = hook_body(prefetch={"patient": patient_resource(), "her2": None})
    (card,) = service.post_hook(body).json()["cards"]
    assert card["suggestions"][0]["actions"][0]["resource"]["status"] == "amended"
    form["decision"] = "entered-in-error"
    form["reason"] = "wrong-lesion"
    board.post(url, form)
    assert service.post_hook(
        hook_body(prefetch={"patient": patient_resource(), "her2": None})
    ).json() == {"cards": []}
    page = board.get(f"{service.url}/review/cases/{rid}").text
    assert "board-amend" in page and "board-entered-in-error" in page and "dr-board" in page
