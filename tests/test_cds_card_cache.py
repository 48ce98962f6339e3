"""The prepared-card cache of the hook path, and the one-transaction jti + audit record.

A card is serialized once per stored prediction and re-stamped per call (patient, biopsy line,
discordance). These tests pin down that the cached answer is exactly what building the card from
scratch gives, that a new prediction (descriptors, board decision) is never answered from the
old entry, that nothing of one patient or call reaches another, and that deferring the jti
record to the call's single transaction lets no replay through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cds_support import (
    MASS_DESCRIPTORS,
    SERVICE_PATH,
    ReviewClient,
    Service,
    her2_bundle,
    hook_body,
    make_token,
    patient_resource,
    result_payload,
    running_service,
    walk_empty,
)

from cds_service.biopsy import BiopsyHer2, BiopsyReading, latest_reading
from cds_service.card_cache import CardCache, CardTemplate, PreparedCard, Slot
from cds_service.cards import CardContext, PredictionBasis, biopsy_line, build_prediction_card
from cds_service.fhir_transparency import DescriptorSource
from cds_service.orm import AuditEvent, UsedJti
from models.prediction import Prediction


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


def _state(svc: Service) -> Any:
    return svc.app.extensions["her2low_cds"]


def _publish(svc: Service, **kwargs: Any) -> str:
    response = svc.publish(result_payload(**kwargs))
    assert response.status_code == 201, response.text
    return str(response.json()["result_id"])


def _card(svc: Service, pid: str = "pat-1", mrn: str = "MRN-1", her2: Any = None) -> Any:
    body = hook_body(pid, prefetch={"patient": patient_resource(pid, mrn), "her2": her2})
    response = svc.post_hook(body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert walk_empty(response.json()) == []
    cards = response.json()["cards"]
    return cards[0] if cards else None


def _fresh_card(svc: Service, rid: str, pid: str, her2: Any) -> dict[str, Any]:
    """The card built from scratch (no cache) from the latest stored prediction."""
    st = _state(svc)
    case = st.store.case(rid)
    row = case.prediction
    basis = PredictionBasis.stored(row.basis)
    base = svc.url
    ctx = CardContext(
        result_id=rid,
        card_uuid=row.card_uuid,
        acquired_at=case.result.acquired_at,
        computed_at=row.computed_at,
        laterality=case.result.laterality,
        roi=basis.roi,
        qc=basis.qc,
        observation=row.observation,
        observation_status=row.observation_status,
        case_url=f"{base}/review/cases/{rid}",
        descriptors_url=f"{base}/review/cases/{rid}#descriptors",
        model_card_url=f"{base}/review/model-card",
        descriptors_entered=basis.descriptors_entered,
        biopsy=latest_reading(her2) if her2 else BiopsyReading(BiopsyHer2.UNKNOWN),
        descriptors_source=(
            DescriptorSource(
                case.descriptors.entered_by, case.descriptors.version, case.descriptors.entered_at
            )
            if case.descriptors
            else None
        ),
    )
    prediction = Prediction.from_dict(row.prediction)
    discordant = prediction.above_threshold and ctx.biopsy.status is BiopsyHer2.ZERO
    card = build_prediction_card(
        prediction, ctx, pid, discordant=discordant, biopsy_text=biopsy_line(ctx.biopsy)
    )
    # what goes over the wire: JSON (tuples become lists etc.)
    loaded: dict[str, Any] = json.loads(json.dumps(card))
    return loaded


@pytest.mark.parametrize(
    ("adc", "her2_text"),
    [
        (0.00095, None),  # info, no biopsy in the chart
        (0.00095, "1+"),  # info, biopsy HER2-low
        (0.0007, "Negative (0)"),  # at/above threshold + HER2 0 → discordance warning
        (0.0007, 'IHC "2+" \\ équivoque\n<b>'),  # escaping of EHR text spliced into the detail
    ],
)
def test_cached_card_equals_card_built_from_scratch(
    service: Service, adc: float, her2_text: str | None
) -> None:
    rid = _publish(service, adc_mean=adc)
    service.put_descriptors(rid, MASS_DESCRIPTORS)
    her2 = her2_bundle(text=her2_text)
    first = _card(service, her2=her2)
    again = _card(service, her2=her2)  # served from the cache
    assert first == again == _fresh_card(service, rid, "pat-1", her2)
    if her2_text and "équivoque" in her2_text:
        assert her2_text in first["detail"]
    assert _state(service).cards.hits >= 1


def test_discordance_follows_each_calls_biopsy_not_the_cache(service: Service) -> None:
    rid = _publish(service, adc_mean=0.0007)
    service.put_descriptors(rid, MASS_DESCRIPTORS)
    zero = her2_bundle(text="Negative (0)")
    assert _card(service, her2=zero)["indicator"] == "warning"
    assert _card(service, her2=None)["indicator"] == "info"
    assert _card(service, her2=her2_bundle(text="1+"))["indicator"] == "info"
    assert _card(service, her2=zero)["indicator"] == "warning"
    actions = [e.action for e in _state(service).store.audit_for(rid)]
    assert actions.count("card-shown") == 4
    assert actions.count("discordance-detected") == 2


def test_new_descriptors_replace_the_cached_card(service: Service) -> None:
    rid = _publish(service)
    before = _card(service)
    assert before["summary"] == _card(service)["summary"]  # cached
    assert "descriptors have not been entered" in before["detail"]
    assert service.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=False).status_code == 200
    after = _card(service)
    assert after["uuid"] != before["uuid"]
    assert "combined model" in after["detail"] and "combined model" not in before["detail"]
    assert after == _fresh_card(service, rid, "pat-1", None)
    resource = after["suggestions"][0]["actions"][0]["resource"]
    assert resource["status"] == "preliminary"
    service.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=True)
    confirmed = _card(service)
    assert confirmed["suggestions"][0]["actions"][0]["resource"]["status"] == "final"


def test_board_decision_replaces_the_cached_card(service: Service) -> None:
    rid = _publish(service)
    service.put_descriptors(rid, MASS_DESCRIPTORS, confirmed=True)
    shown = _card(service)
    assert shown["suggestions"][0]["actions"][0]["resource"]["status"] == "final"
    assert _card(service) == shown  # now cached
    url = f"{service.url}/review/cases/{rid}/decision"
    board = ReviewClient(service, "oncologist", "dr-board")
    form = {"decision": "amend", "reason": "descriptors-corrected"}
    assert board.post(url, form, allow_redirects=False).status_code == 303
    amended = _card(service)
    assert amended["uuid"] != shown["uuid"]
    assert amended["suggestions"][0]["actions"][0]["resource"]["status"] == "amended"
    assert "Observation status amended" in amended["detail"]
    assert amended == _fresh_card(service, rid, "pat-1", None)
    form.update(decision="entered-in-error", reason="wrong-lesion")
    board.post(url, form, allow_redirects=False)
    assert _card(service) is None


def test_cached_cards_never_leak_between_patients(service: Service) -> None:
    rid_a = _publish(service, patient_id="MRN-A", adc_mean=0.0007)
    rid_b = _publish(service, patient_id="MRN-B", laterality="R")
    for rid in (rid_a, rid_b):
        service.put_descriptors(rid, MASS_DESCRIPTORS)
    seen: dict[str, set[str]] = {"A": set(), "B": set()}
    for _ in range(3):
        for who, rid, pid in (("A", rid_a, "pat-a"), ("B", rid_b, "pat-b")):
            card = _card(service, pid=pid, mrn=f"MRN-{who}")
            resource = card["suggestions"][0]["actions"][0]["resource"]
            assert resource["subject"] == {"reference": f"Patient/{pid}"}
            assert card["links"][0]["url"].endswith(f"/review/cases/{rid}")
            assert card == _fresh_card(service, rid, pid, None)
            text = json.dumps(card)
            other = "pat-b" if who == "A" else "pat-a"
            assert other not in text and "@@" not in text
            seen[who].add(card["uuid"])
    assert len(seen["A"]) == len(seen["B"]) == 1 and seen["A"] != seen["B"]
    # the same stored result under another chart id of the same person: re-stamped subject
    card = _card(service, pid="pat-a2", mrn="MRN-A")
    assert card["suggestions"][0]["actions"][0]["resource"]["subject"] == {
        "reference": "Patient/pat-a2"
    }


def test_template_escapes_spliced_values() -> None:
    card = {
        "uuid": "u",
        "detail": f"before\n{Slot.BIOPSY_LINE.value}\nafter",
        "suggestions": [{"resource": {"subject": f"Patient/{Slot.PATIENT_ID.value}"}}],
    }
    template = CardTemplate(card)
    assert sorted(template.slots) == sorted([Slot.BIOPSY_LINE, Slot.PATIENT_ID])
    nasty = 'a "quote" \\ back\tslash\u2028 ünïcode </script>'
    body = template.render({Slot.BIOPSY_LINE: nasty, Slot.PATIENT_ID: "p-1"})
    parsed = json.loads(body)
    assert parsed["cards"][0]["detail"] == f"before\n{nasty}\nafter"
    assert parsed["cards"][0]["suggestions"][0]["resource"]["subject"] == "Patient/p-1"
    with pytest.raises(KeyError):
        template.render({Slot.PATIENT_ID: "p-1"})  # a slot never goes out unfilled


_UIDS = st.sampled_from(["1.2.3", "1.2.3.4", "9.9"])


@st.composite
def _study_references(draw: st.DrawFn) -> dict[str, Any]:
    ref: dict[str, Any] = {
        "type": draw(st.sampled_from(["ImagingStudy", "ImagingStudy", "Patient"])),
        "identifier": {
            "system": draw(st.sampled_from(["urn:dicom:uid", "urn:dicom:uid", "urn:other"])),
            "value": "urn:oid:" + draw(_UIDS),
        },
    }
    if draw(st.booleans()) and draw(st.booleans()):
        ref["reference"] = "ImagingStudy/already"
    if draw(st.booleans()):
        ref["display"] = draw(st.text(max_size=8))
    return ref


@st.composite
def _cards_with_study_references(draw: st.DrawFn) -> dict[str, Any]:
    """Cards whose resources reference studies by UID, by literal reference, or not at all."""
    refs = _study_references()
    return {
        "uuid": "u",
        "detail": Slot.BIOPSY_LINE.value,
        "suggestions": [
            {
                "resource": {
                    "subject": f"Patient/{Slot.PATIENT_ID.value}",
                    "derivedFrom": draw(st.lists(refs, max_size=3)),
                    "nested": [{"entity": draw(st.lists(refs, max_size=2))}],
                }
            }
        ],
    }


def _linked(value: Any, study_ids: dict[str, str]) -> Any:
    """Oracle: each ImagingStudy reference by a DICOM UID the EHR names gains its literal
    reference, as the first key; everything else as it was."""
    if isinstance(value, list):
        return [_linked(v, study_ids) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _linked(v, study_ids) for k, v in value.items()}
    ident = out.get("identifier")
    if out.get("type") == "ImagingStudy" and isinstance(ident, dict) and "reference" not in out:
        uid = ident["value"].removeprefix("urn:oid:")
        if ident.get("system") == "urn:dicom:uid" and uid in study_ids:
            out = {"reference": f"ImagingStudy/{study_ids[uid]}", **out}
    return out


@settings(max_examples=150, deadline=None)
@given(
    card=_cards_with_study_references(),
    study_ids=st.dictionaries(_UIDS, st.text(min_size=1, max_size=12), max_size=3),
)
def test_template_names_the_ehrs_imaging_studies_as_a_parsed_card_would(
    card: dict[str, Any], study_ids: dict[str, str]
) -> None:
    """The ImagingStudy ids are spliced into the prepared bytes (no parse of the card per call):
    the body is exactly the serialized card with the references linked, key order included."""
    values = {Slot.BIOPSY_LINE: "biopsy", Slot.PATIENT_ID: "p-1"}
    body = CardTemplate(card).render(values, study_ids)
    filled = json.loads(
        json.dumps(card)
        .replace(Slot.BIOPSY_LINE.value, "biopsy")
        .replace(Slot.PATIENT_ID.value, "p-1")
    )
    expected = json.dumps(
        {"cards": [_linked(filled, study_ids)]}, ensure_ascii=False, separators=(",", ":")
    )
    assert body.decode() == expected  # so no mark is left either: the expected body has none


def test_cache_is_bounded_lru() -> None:
    cache = CardCache(maxsize=2)
    built: list[int] = []

    def entry(n: int) -> PreparedCard:
        built.append(n)
        return PreparedCard(str(n), None, None, needs_biopsy=False)

    for n in (1, 2, 1, 3, 1, 2):
        assert cache.get_or_build(n, lambda n=n: entry(n)).card_uuid == str(n)
    assert built == [1, 2, 3, 2] and len(cache) == 2


# --- jti + audit in one transaction -------------------------------------------------------------


def _count(svc: Service, model: Any) -> int:
    with _state(svc).store.sessions() as s:
        return s.query(model).count()


def test_replay_on_hook_refused_and_not_audited(service: Service) -> None:
    _publish(service)
    token = make_token(service.url + SERVICE_PATH)
    body = hook_body(prefetch={"patient": patient_resource(), "her2": None})
    headers = {"Authorization": f"Bearer {token}"}
    url = service.url + SERVICE_PATH
    assert requests.post(url, json=body, headers=headers, timeout=10).status_code == 200
    assert _shown(service) == 1
    replay = requests.post(url, json=body, headers=headers, timeout=10)
    assert replay.status_code == 401 and "cards" not in replay.json()
    assert _shown(service) == 1
    assert _count(service, UsedJti) == 1


@pytest.mark.parametrize(
    "body",
    [
        hook_body(prefetch={"patient": patient_resource()}),  # her2 missing → 412
        {"hook": "patient-view"},  # 400
        hook_body(prefetch={"patient": None}),  # no patient → no cards, no audit
    ],
)
def test_jti_used_even_when_the_call_ends_without_a_card(
    service: Service, body: dict[str, Any]
) -> None:
    _publish(service)
    token = make_token(service.url + SERVICE_PATH)
    headers = {"Authorization": f"Bearer {token}"}
    first = requests.post(service.url + SERVICE_PATH, json=body, headers=headers, timeout=10)
    assert first.status_code in (200, 400, 412)
    assert _count(service, UsedJti) == 1
    # the same token with a good body is still a replay
    good = hook_body(prefetch={"patient": patient_resource(), "her2": None})
    again = requests.post(service.url + SERVICE_PATH, json=good, headers=headers, timeout=10)
    assert again.status_code == 401
    assert _shown(service) == 0


def _shown(svc: Service) -> int:
    with _state(svc).store.sessions() as s:
        return s.query(AuditEvent).filter(AuditEvent.action == "card-shown").count()


def test_same_jti_fresh_signature_refused_on_hook(service: Service) -> None:
    _publish(service)
    token = make_token(service.url + SERVICE_PATH)
    body = hook_body(prefetch={"patient": patient_resource(), "her2": None})
    url = service.url + SERVICE_PATH
    first = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert first.status_code == 200
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    again = make_token(service.url + SERVICE_PATH, jti=jti)
    response = requests.post(
        url, json=body, headers={"Authorization": f"Bearer {again}"}, timeout=10
    )
    assert response.status_code == 401
