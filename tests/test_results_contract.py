"""The one results contract (models.contract): built by the node, validated by the service, and
checked against the settings recorded in the model card before anything is scored."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY
from pydantic import ValidationError
from test_cds_support import (
    FULL_FEATURES,
    RESULTS_TOKEN,
    ReviewClient,
    Service,
    hook_body,
    is_operation_outcome,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)

from models.card import fit_settings, read_card
from models.contract import (
    DEFAULT_CONVENTIONS,
    QUANTITATIVE_NAMES,
    AnalysisConventions,
    Discretisation,
    FitSettings,
    Laterality,
    Map,
    Provenance,
    ResultPayload,
    SettingsMismatchError,
    TrainingSettings,
)
from models.registry import reference_root
from models.runtime import ModelRuntime

AUTH = {"Authorization": f"Bearer {RESULTS_TOKEN}"}
REFERENCE = reference_root() / "her2low-reference" / "0.1.0"


@pytest.fixture
def real_model_service(tmp_path: Path) -> Iterator[Service]:
    """The service scoring with the shipped reference model (its card's settings)."""
    svc = start_service(tmp_path, predictor=None)
    yield svc
    stop_service(svc)


def _not_scored(reason: str) -> float:
    value = REGISTRY.get_sample_value("her2low_results_not_scored_total", {"reason": reason})
    return value or 0.0


# --- the classes themselves -------------------------------------------------------------------


def test_wire_json_round_trips_through_the_same_class() -> None:
    body = result_payload(previews=True)
    parsed = ResultPayload.model_validate(body)
    assert parsed.laterality is Laterality.LEFT
    assert parsed.provenance.conventions == DEFAULT_CONVENTIONS
    again = ResultPayload.model_validate(json.loads(json.dumps(parsed.to_json())))
    assert again == parsed
    assert parsed.to_json()["acquired_at"] == "2026-11-25T10:00:00Z"


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("features", "adc_mean"), "0.001", "features.adc_mean"),  # a string is not a number
        (("provenance", "roi", "confirmed"), 1, "provenance.roi.confirmed"),
        (("provenance", "roi", "source"), "manual", "provenance.roi.source"),
        (("provenance", "fit", "dki_bmin"), -1, "provenance.fit.dki_bmin"),
        (("provenance", "discretisation", "bin_width"), {"adc": 2.5e-5}, "bin_width"),
        (("provenance", "statistics", "kurtosis"), "fisher", "provenance.statistics.kurtosis"),
        (("acquired_at",), "9999-12-31T23:59:59-05:00", "acquired_at"),  # overflows in UTC
        (("api_version",), True, "api_version"),
    ],
)
def test_invalid_fields_are_named(path: tuple[str, ...], value: Any, where: str) -> None:
    body = result_payload()
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        ResultPayload.model_validate(body)
    errors = info.value.errors()
    assert any(where in ".".join(str(p) for p in e["loc"]) or where in e["msg"] for e in errors)


def test_provenance_is_required_to_state_its_settings() -> None:
    body = result_payload()
    del body["provenance"]["discretisation"]
    with pytest.raises(ValidationError, match="discretisation"):
        ResultPayload.model_validate(body)
    body = result_payload()
    del body["provenance"]["fit"]["method"]  # never read as the default "nls"
    with pytest.raises(ValidationError, match=r"fit\.method: required"):
        ResultPayload.model_validate(body)
    assert Provenance.stored({"roi": {"source": "seg"}}) is None  # a pre-contract row


def test_differences_name_each_setting() -> None:
    other = AnalysisConventions(
        fit=FitSettings(method="wls"),
        discretisation=Discretisation(bin_width={Map.ADC: 5e-5, Map.DAPP: 2.5e-5, Map.KAPP: 0.025}),
    )
    assert DEFAULT_CONVENTIONS.differences(other) == [
        "discretisation.bin_width.adc: result 5e-05, model 2.5e-05",
        "fit.method: result 'wls', model 'nls'",
    ]
    assert DEFAULT_CONVENTIONS.differences(AnalysisConventions()) == []


# --- the model card and the runtime -------------------------------------------------------------


def test_reference_cards_record_todays_settings_and_old_cards_default_to_them() -> None:
    for variant in ("combined", "descriptors", "quantitative"):
        card = read_card(REFERENCE / variant)
        assert fit_settings(card) == TrainingSettings()
        assert TrainingSettings.from_card(card["fit_settings"]).to_card() == card["fit_settings"]
    legacy = read_card(REFERENCE / "combined")
    del legacy["fit_settings"]
    assert fit_settings(legacy).conventions == DEFAULT_CONVENTIONS


def test_runtime_refuses_results_computed_with_other_settings(tmp_path: Path) -> None:
    model = tmp_path / "quantitative"
    shutil.copytree(REFERENCE / "quantitative", model)
    card = json.loads((model / "card.json").read_text())
    card["fit_settings"]["method"] = "wls"
    (model / "card.json").write_text(json.dumps(card))
    runtime = ModelRuntime.load(model)
    features = {name: None for name in QUANTITATIVE_NAMES}
    features.update(FULL_FEATURES)
    with pytest.raises(SettingsMismatchError, match=r"fit\.method: result 'nls', model 'wls'"):
        runtime.predict(features, conventions=DEFAULT_CONVENTIONS)
    wls = AnalysisConventions(fit=FitSettings(method="wls"))
    assert 0 < runtime.predict(features, conventions=wls).probability < 1


# --- over HTTP: the service validates with the same classes and refuses to score ----------------


def test_unknown_feature_is_refused_naming_it(real_model_service: Service) -> None:
    body = result_payload()
    body["features"]["adc_mystery"] = 0.001
    response = real_model_service.publish(body)
    assert response.status_code == 422 and is_operation_outcome(response)
    issue = response.json()["issue"][0]
    assert "adc_mystery" in issue["diagnostics"]
    assert issue["expression"] == ["features.adc_mystery"]


def test_out_of_range_acquisition_time_is_a_4xx(real_model_service: Service) -> None:
    response = real_model_service.publish(
        dict(result_payload(), acquired_at="9999-12-31T23:59:59-05:00")
    )
    assert response.status_code == 422 and is_operation_outcome(response)
    assert response.json()["issue"][0]["expression"] == ["acquired_at"]


def test_mismatched_fit_setting_is_accepted_but_not_scored(real_model_service: Service) -> None:
    svc = real_model_service
    before = _not_scored("mismatch")
    body = dict(result_payload(patient_id="MRN-77"), features=dict(FULL_FEATURES))
    body["provenance"] = copy.deepcopy(body["provenance"])
    body["provenance"]["fit"]["method"] = "wls"
    response = svc.publish(body)
    assert response.status_code == 201, response.text
    rid = response.json()["result_id"]

    case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    prediction = case["prediction"]
    assert prediction["probability"] is None and prediction["variant"] is None
    assert "fit.method: result 'wls', model 'nls'" in prediction["not_scored"]
    assert "fit.method" in prediction["error"]
    assert case["provenance"]["fit"]["method"] == "wls"  # stored as sent, typed on the way back
    assert _not_scored("mismatch") == before + 1

    # No card in the EHR, not even the "descriptors needed" one.
    hook = hook_body("pat-77", prefetch={"patient": patient_resource("pat-77", "MRN-77")})
    answer = svc.post_hook(hook)
    assert answer.status_code == 200 and answer.json()["cards"] == []

    # The reason is visible on the review case page.
    page = ReviewClient(svc, "radiologist").get(f"{svc.url}/review/cases/{rid}")
    assert page.status_code == 200
    assert "not scored" in page.text and "fit.method" in page.text


def test_matching_settings_are_scored_by_the_reference_model(real_model_service: Service) -> None:
    response = real_model_service.publish(dict(result_payload(), features=dict(FULL_FEATURES)))
    assert response.status_code == 201
    rid = response.json()["result_id"]
    case = requests.get(
        f"{real_model_service.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10
    ).json()
    assert 0 < case["prediction"]["probability"] < 1
    assert case["prediction"]["not_scored"] is None
