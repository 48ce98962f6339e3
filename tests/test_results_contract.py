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
    DEFAULT_FIT,
    LEGACY_CONVENTIONS,
    PIPELINE_VERSION,
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
    del body["provenance"]["fit"]["method"]  # never read as a default method
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
        "fit.denoise: result None, model 'mppca'",  # FitSettings' own defaults: legacy, none
        "fit.method: result 'wls', model 'nls_rician'",
    ]
    assert DEFAULT_CONVENTIONS.differences(AnalysisConventions()) == []


# --- the model card and the runtime -------------------------------------------------------------


def test_reference_cards_record_todays_settings_and_old_cards_mean_the_legacy_fit() -> None:
    for variant in ("combined", "descriptors", "quantitative"):
        card = read_card(REFERENCE / variant)
        assert fit_settings(card) == TrainingSettings()
        assert TrainingSettings.from_card(card["fit_settings"]).to_card() == card["fit_settings"]
    legacy = read_card(REFERENCE / "combined")
    del legacy["fit_settings"]  # a card from before the field: trained with nls, no denoising
    assert fit_settings(legacy).conventions == LEGACY_CONVENTIONS != DEFAULT_CONVENTIONS
    assert LEGACY_CONVENTIONS.fit.method == "nls" and LEGACY_CONVENTIONS.fit.denoise == "none"
    no_denoise_key = dict(read_card(REFERENCE / "combined")["fit_settings"])
    del no_denoise_key["denoise"]  # an absent key keeps its legacy meaning, not the default's
    assert TrainingSettings.from_card(no_denoise_key).conventions.fit.denoise == "none"


def test_reference_card_states_the_new_default_conventions_honestly() -> None:
    """The simulated features are relabelled to dki-2's default, and the card says what they are."""
    assert PIPELINE_VERSION == "dki-2"
    for variant in ("combined", "descriptors", "quantitative"):
        card = read_card(REFERENCE / variant)
        fs = card["fit_settings"]
        assert (fs["method"], fs["denoise"]) == ("nls_rician", "mppca")
        assert (fs["method"], fs["denoise"]) == (DEFAULT_FIT.method, DEFAULT_FIT.denoise)
        text = card["training_data"]["description"]
        assert "drawn by the simulator, not computed by a DKI fit" in text
        assert "MP-PCA" in text and "nls_rician" in text
        assert any("stored but not scored" in lim for lim in card["limitations"])
        md = (REFERENCE / variant / "card.md").read_text()
        assert "method `nls_rician`" in md and "denoising before the fit: mppca" in md
        assert "drawn by the simulator" in md


def test_runtime_refuses_results_computed_with_other_settings(tmp_path: Path) -> None:
    model = tmp_path / "quantitative"
    shutil.copytree(REFERENCE / "quantitative", model)
    card = json.loads((model / "card.json").read_text())
    card["fit_settings"]["method"] = "wls"
    (model / "card.json").write_text(json.dumps(card))
    runtime = ModelRuntime.load(model)
    features = {name: None for name in QUANTITATIVE_NAMES}
    features.update(FULL_FEATURES)
    with pytest.raises(
        SettingsMismatchError, match=r"fit\.method: result 'nls_rician', model 'wls'"
    ):
        runtime.predict(features, conventions=DEFAULT_CONVENTIONS)
    wls = AnalysisConventions(fit=DEFAULT_FIT.model_copy(update={"method": "wls"}))
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
    assert "fit.method: result 'wls', model 'nls_rician'" in prediction["not_scored"]
    assert "fit.method" in prediction["error"]
    assert case["provenance"]["fit"]["method"] == "wls"  # stored as sent, typed on the way back
    assert _not_scored("mismatch") == before + 1

    # The EHR gets one card saying there is no estimate and why; never a number.
    hook = hook_body("pat-77", prefetch={"patient": patient_resource("pat-77", "MRN-77")})
    answer = svc.post_hook(hook)
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert card["summary"] == "No MRI HER2-low estimate: analysis settings differ from the model's"
    assert "fit.method: result 'wls', model 'nls_rician'" in card["detail"]
    assert "not clinically validated" in card["detail"]
    assert "suggestions" not in card and "%" not in card["summary"]

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


def test_a_result_computed_the_dki_1_way_is_stored_but_not_scored(
    real_model_service: Service,
) -> None:
    """nls without denoising (the old default, and today's no-sigma fallback) is not mixed in."""
    svc = real_model_service
    before = _not_scored("mismatch")
    body = dict(result_payload(patient_id="MRN-78"), features=dict(FULL_FEATURES))
    body["pipeline_version"] = "dki-1"
    body["provenance"] = copy.deepcopy(body["provenance"])
    body["provenance"]["fit"]["method"] = "nls"
    del body["provenance"]["fit"]["denoise"]  # how a dki-1 node sent it
    response = svc.publish(body)
    assert response.status_code == 201, response.text
    rid = response.json()["result_id"]
    case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    prediction = case["prediction"]
    assert prediction["probability"] is None and prediction["variant"] is None
    assert "fit.denoise: result None, model 'mppca'" in prediction["not_scored"]
    assert "fit.method: result 'nls', model 'nls_rician'" in prediction["not_scored"]
    assert "denoise" not in case["provenance"]["fit"]  # stored as sent
    assert _not_scored("mismatch") == before + 1

    # The same series analysed again by a dki-2 node is a separate result, and it is scored.
    again = dict(
        result_payload(patient_id="MRN-78", series=body["series_instance_uid"]),
        features=dict(FULL_FEATURES),
    )
    response = svc.publish(again)
    assert response.status_code == 201, response.text
    new_rid = response.json()["result_id"]
    assert new_rid != rid
    case = requests.get(f"{svc.url}/api/v1/cases/{new_rid}", headers=AUTH, timeout=10).json()
    assert case["pipeline_version"] == PIPELINE_VERSION
    assert 0 < case["prediction"]["probability"] < 1
