"""Out of distribution: the card records the training domain, and a case outside it is scored
only with a visible warning on the card, in the Observation and on the review page."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_cds_support import (
    FULL_FEATURES,
    RESULTS_TOKEN,
    ReviewClient,
    Service,
    her2_bundle,
    hook_body,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)

from models.build_reference import REFERENCE_SEED
from models.card import read_card, render_markdown
from models.contract import Provenance, ScannerInfo
from models.data import read_cohort_csv, write_cohort_csv
from models.domain import TrainingDomain, outside
from models.prediction import ModelVariant
from models.registry import reference_root
from models.simulate import simulate_cohort

AUTH = {"Authorization": f"Bearer {RESULTS_TOKEN}"}
REFERENCE = reference_root() / "her2low-reference" / "0.1.0"


def _provenance(**change: Any) -> Provenance:
    body = copy.deepcopy(result_payload()["provenance"])
    body.update(change)
    return Provenance.model_validate(body)


DOMAIN = TrainingDomain(
    b_values=(0, 50, 800, 1000, 1500, 2000),
    field_strengths_t=(3.0,),
    vendors=("Siemens",),
    feature_ranges={"kapp_p95": (0.8, 1.6), "dapp_mean": (0.9e-3, 1.6e-3)},
)


# --- the check ---------------------------------------------------------------------------------


def test_a_case_inside_the_domain_has_no_warning() -> None:
    prov = _provenance(scanner={"manufacturer": "SIEMENS Healthineers", "field_strength_t": 2.89})
    assert outside(DOMAIN, prov, {"kapp_p95": 1.2, "dapp_mean": 1.3e-3}) == []
    # Repeated or slightly different b (within 5 %) is the same protocol.
    same = _provenance(b_values=[0, 0, 50, 800, 1000, 1000, 1490, 2000])
    assert outside(DOMAIN, same, {}) == []


@pytest.mark.parametrize(
    ("change", "features", "words"),
    [
        ({"b_values": [0, 800, 1500]}, {}, "b-values 0, 800, 1500 s/mm2 differ"),
        ({"scanner": {"field_strength_t": 1.5}}, {}, "field strength 1.5 T is not in"),
        ({"scanner": {"manufacturer": "GE MEDICAL SYSTEMS"}}, {}, "vendor GE MEDICAL SYSTEMS"),
        ({}, {"kapp_p95": 2.1}, "kapp_p95 = 2.1 is outside the training range 0.8 to 1.6"),
        ({}, {"dapp_mean": 0.5e-3}, "dapp_mean = 0.5 10^-3 mm2/s is outside"),
    ],
)
def test_each_way_out_is_named(
    change: dict[str, Any], features: dict[str, float], words: str
) -> None:
    warnings = outside(DOMAIN, _provenance(**change), features)
    assert len(warnings) == 1 and words in warnings[0]


def test_unrecorded_scanner_is_not_checked() -> None:
    domain = TrainingDomain(b_values=DOMAIN.b_values)
    prov = _provenance(scanner={"manufacturer": "Philips", "field_strength_t": 1.5})
    assert outside(domain, prov, {"kapp_p95": 9.0}) == []
    assert ScannerInfo().field_strength_t is None  # optional: older results validate


# --- the reference cards -----------------------------------------------------------------------


def test_reference_cards_record_the_simulated_cohort_domain(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    write_cohort_csv(path, simulate_cohort(REFERENCE_SEED))
    cohort = read_cohort_csv(path)
    for variant in ModelVariant:
        card = read_card(REFERENCE / variant.value)
        domain = TrainingDomain.from_card(card)
        assert domain is not None
        assert domain.b_values == tuple(card["fit_settings"]["b_values"])
        assert domain.field_strengths_t == () and domain.vendors == ()  # simulated: no scanner
        numeric = [i["name"] for i in card["inputs"] if i["kind"] == "numeric"]
        assert sorted(domain.feature_ranges) == sorted(numeric)
        for name, (lo, hi) in domain.feature_ranges.items():
            values = [float(v) for v in cohort.matrix([name])[:, 0]]
            assert (lo, hi) == (min(values), max(values))
        text = render_markdown(card)
        assert "## Training domain" in text and "not recorded" in text


# --- the service ---------------------------------------------------------------------------------


@pytest.fixture
def real_model_service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path, predictor=None)
    yield svc
    stop_service(svc)


def _publish(svc: Service, patient_id: str, **features: float) -> str:
    body = dict(result_payload(patient_id=patient_id), features={**FULL_FEATURES, **features})
    response = svc.publish(body)
    assert response.status_code == 201, response.text
    return str(response.json()["result_id"])


def _card(svc: Service, pid: str, mrn: str) -> dict[str, Any]:
    prefetch = {"patient": patient_resource(pid, mrn), "her2": her2_bundle(pid, text="1+")}
    cards = svc.post_hook(hook_body(pid, prefetch=prefetch)).json()["cards"]
    assert len(cards) == 1
    return dict(cards[0])


def test_outside_case_is_scored_with_a_warning_everywhere(real_model_service: Service) -> None:
    svc = real_model_service
    rid = _publish(svc, "MRN-91", kapp_p95=2.5)
    case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    assert 0 < case["prediction"]["probability"] < 1  # scored, not refused

    card = _card(svc, "pat-91", "MRN-91")
    assert "outside training data" in card["summary"]
    assert "Outside the model's training data" in card["detail"]
    assert "kapp_p95 = 2.5 is outside the training range" in card["detail"]
    observation = card["suggestions"][0]["actions"][0]["resource"]
    assert observation["resourceType"] == "Observation"
    notes = [n["text"] for n in observation["note"]]
    assert any("Outside the model's training data" in n and "kapp_p95" in n for n in notes)

    page = ReviewClient(svc, "radiologist").get(f"{svc.url}/review/cases/{rid}")
    assert page.status_code == 200
    assert "Outside the model" in page.text and "kapp_p95 = 2.5 is outside" in page.text


def test_inside_case_has_no_warning(real_model_service: Service) -> None:
    svc = real_model_service
    rid = _publish(svc, "MRN-92")
    card = _card(svc, "pat-92", "MRN-92")
    assert "outside" not in card["summary"] and "Outside the model" not in card["detail"]
    page = ReviewClient(svc, "radiologist").get(f"{svc.url}/review/cases/{rid}")
    assert "Outside the model" not in page.text
