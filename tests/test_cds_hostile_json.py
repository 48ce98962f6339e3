"""Hostile JSON from an authenticated caller never gets a 5xx (issue 10, "The service").

A signed EHR (CDS Hooks call and feedback) or the node holding the results token (results API,
descriptors) may still send anything: nesting thousands deep, lone UTF-16 surrogates, numbers no
double holds, instants that overflow in UTC, NaN/Infinity literals, wrong types anywhere. Each
must end as a 4xx OperationOutcome (or a normal answer), never a 500 or a stack trace.

The examples pin the cases found by hand; the properties put generated hostile values at every
place of a valid body of each JSON endpoint. The app is driven through Flask's test client (no
sockets) with a fresh signed JWT per call; example counts are small (CI has 2 cores).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cds_support import (
    MASS_DESCRIPTORS,
    RESULTS_TOKEN,
    SERVICE_PATH,
    Service,
    her2_bundle,
    hook_body,
    issued_card,
    make_token,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from cds_service.request_json import (
    MAX_DEPTH,
    JsonInputError,
    nesting_depth,
    parse_json,
    parse_timestamp,
)

FEEDBACK_PATH = SERVICE_PATH + "/feedback"
SENTINEL = "\x00hostile\x00"
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


IMAGING = {
    "resourceType": "Bundle",
    "type": "searchset",
    "entry": [
        {
            "resource": {
                "resourceType": "ImagingStudy",
                "id": "img-1",
                "identifier": [
                    {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"}
                ],
            }
        }
    ],
}


@dataclass
class Target:
    """One running service with a published result and an issued card to aim at."""

    service: Service
    result_id: str
    card_uuid: str

    def send(self, endpoint: str, raw: bytes | str) -> TestResponse:
        """POST/PUT ``raw`` as JSON to ``endpoint`` (hook, feedback, results, descriptors)."""
        client = self.service.app.test_client()
        data = raw.encode() if isinstance(raw, str) else raw
        headers = {"Content-Type": "application/json"}
        if endpoint in ("hook", "feedback"):
            path = SERVICE_PATH if endpoint == "hook" else FEEDBACK_PATH
            headers["Authorization"] = f"Bearer {make_token(self.service.url + path)}"
            return client.post(path, data=data, headers=headers)
        headers["Authorization"] = f"Bearer {RESULTS_TOKEN}"
        if endpoint == "results":
            return client.post("/api/v1/results", data=data, headers=headers)
        path = f"/api/v1/cases/{self.result_id}/descriptors"
        return client.put(path, data=data, headers=headers)

    def valid_body(self, endpoint: str) -> dict[str, Any]:
        """A body the endpoint accepts: the hostile values are put into it."""
        if endpoint == "hook":
            prefetch = {"patient": patient_resource(), "her2": her2_bundle(), "imaging": IMAGING}
            return hook_body(prefetch=prefetch)
        if endpoint == "feedback":
            item = {
                "card": self.card_uuid,
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": "urn:x", "code": "disagree", "display": "Disagree"},
                    "userComment": "IHC repeated",
                },
                "acceptedSuggestions": [{"id": "s-1"}],
                "outcomeTimestamp": "2026-11-25T11:00:00Z",
            }
            return {"feedback": [item]}
        if endpoint == "results":
            return result_payload(series="1.2.826.0.1.3680043.8.498.77", previews=True)
        return {"values": dict(MASS_DESCRIPTORS), "roi_confirmed": True, "entered_by": "dr-x"}


ENDPOINTS = ("hook", "feedback", "results", "descriptors")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # A generated fhirServer must never be contacted: only loopback port 9 (discard, closed).
    svc = start_service(
        tmp_path_factory.mktemp("hostile"), cds_fhir_server_allowlist=["http://127.0.0.1:9/"]
    )
    try:
        card = issued_card(svc)
        (case,) = svc.app.extensions["her2low_cds"].store.worklist()
        yield Target(svc, case.result.id, card["uuid"])
    finally:
        stop_service(svc)


def assert_clean(response: TestResponse) -> dict[str, Any]:
    """No 5xx; JSON always; every error an OperationOutcome. Returns the body."""
    assert response.status_code < 500, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data())
    if response.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    return dict(body)


def issue_of(response: TestResponse) -> dict[str, Any]:
    return dict(assert_clean(response)["issue"][0])


def with_raw(body: dict[str, Any], path: tuple[str | int, ...], raw: str) -> str:
    """``body`` as JSON text with the value at ``path`` replaced by the raw JSON text ``raw``."""
    doc = copy.deepcopy(body)
    if not path:
        return raw
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = SENTINEL
    return json.dumps(doc).replace(json.dumps(SENTINEL), raw, 1)


def places(body: Any) -> list[tuple[str | int, ...]]:
    """Every path in ``body`` (iteratively), plus a new key in every object."""
    found: list[tuple[str | int, ...]] = [()]
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while stack:
        path, node = stack.pop()
        children: list[tuple[str | int, Any]] = []
        if isinstance(node, dict):
            children = list(node.items())
            found.append((*path, "extraKey"))
        elif isinstance(node, list):
            children = list(enumerate(node))
        for key, child in children:
            found.append((*path, key))
            stack.append(((*path, key), child))
    return found


# --- hostile JSON text ----------------------------------------------------------------------

LONE_SURROGATES = ["\ud800", "MRN-\udfff", "\udc00\ud800", "a\ud83d", "\ud83d\ud83d"]
EXTREME_TIMES = [
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59.999999Z",
    "0001-01-01",
    "2026-02-30T00:00:00Z",
    "2026-11-25T24:00:00Z",
    "2026-11-25T10:00:00+24:00",
    "+12026-11-25T10:00:00Z",
    "2026-11-25T10:00:00Z\u0000",
    "",
]
LITERALS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1E+999999",
    "1e-400",
    "9223372036854775808",
    "-" + "9" * 5000,
    "1" + "0" * 40 + ".5",
    "true",
    "null",
    "[]",
    "{}",
    '"\\u0000"',
]
_OFFSETS = [
    UTC,
    timezone(timedelta(hours=-23, minutes=-59)),
    timezone(timedelta(hours=23, minutes=59)),
]

timestamps = st.one_of(
    st.sampled_from(EXTREME_TIMES),
    st.datetimes(
        min_value=datetime.min, max_value=datetime.max, timezones=st.sampled_from(_OFFSETS)
    ).map(datetime.isoformat),
)
texts = st.one_of(st.sampled_from(LONE_SURROGATES), timestamps, st.text(max_size=12))
json_texts = texts.map(json.dumps)  # lone surrogates become "\ud800" escapes
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.sampled_from(LITERALS),
)
deep = st.integers(min_value=MAX_DEPTH - 1, max_value=5000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
)
leaves = st.one_of(json_texts, numbers, deep)
hostile_raw = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(json_texts, inner), max_size=3).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        ),
    ),
    max_leaves=6,
)


# --- examples found by hand (each a 500 before the fix) -----------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_is_a_400(target: Target, endpoint: str, depth: int) -> None:
    raw = with_raw(target.valid_body(endpoint), ("nested",), "[" * depth + "]" * depth)
    response = target.send(endpoint, raw)
    assert response.status_code == 400
    assert "nested deeper than" in issue_of(response)["diagnostics"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400", "1" + "0" * 30])
def test_non_finite_and_huge_numbers_are_a_400(target: Target, endpoint: str, literal: str) -> None:
    response = target.send(endpoint, with_raw(target.valid_body(endpoint), ("x",), literal))
    assert response.status_code == 400, response.get_data(as_text=True)


OBSERVATION = ("prefetch", "her2", "entry", 0, "resource")


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ((*OBSERVATION, "status"), "[]"),
        ((*OBSERVATION, "code"), '"48676-1"'),
        ((*OBSERVATION, "code", "coding"), "7"),
        ((*OBSERVATION, "interpretation"), "5"),
        ((*OBSERVATION, "valueCodeableConcept", "coding"), "true"),
        (("prefetch", "her2", "entry"), "3"),
        (("prefetch", "patient", "identifier"), "7"),
        (("prefetch", "imaging", "entry", 0, "resource", "identifier"), "1"),
    ],
)
def test_wrong_types_in_prefetched_resources_are_read_leniently(
    target: Target, path: tuple[str | int, ...], raw: str
) -> None:
    """A malformed element costs that element (no card, or a card without it), never a 500."""
    response = target.send("hook", with_raw(target.valid_body("hook"), path, raw))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert_clean(response)


def test_lone_surrogate_in_a_patient_identifier_is_a_400(target: Target) -> None:
    body = target.valid_body("hook")
    raw = with_raw(body, ("prefetch", "patient", "identifier", 0, "value"), '"\\ud800"')
    response = target.send("hook", raw)
    assert response.status_code == 400
    issue = issue_of(response)
    assert issue["expression"] == ["prefetch.patient.identifier.0.value"]


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("feedback", ("feedback", 0, "card")),
        ("results", ("patient", "id")),
        ("descriptors", ("entered_by",)),
    ],
)
def test_lone_surrogate_anywhere_is_a_400(
    target: Target, endpoint: str, path: tuple[str | int, ...]
) -> None:
    response = target.send(endpoint, with_raw(target.valid_body(endpoint), path, '"\\udc00"'))
    assert response.status_code == 400 and issue_of(response)["expression"] == [
        ".".join(map(str, path))
    ]


def test_feedback_timestamp_overflowing_in_utc_is_a_400(target: Target) -> None:
    body = target.valid_body("feedback")
    body["feedback"][0]["outcomeTimestamp"] = "9999-12-31T23:59:59-23:59"
    response = target.send("feedback", json.dumps(body))
    assert response.status_code == 400
    assert issue_of(response)["expression"] == ["feedback.0.outcomeTimestamp"]


def test_results_acquired_at_overflowing_in_utc_is_a_422(target: Target) -> None:
    body = target.valid_body("results")
    body["acquired_at"] = "9999-12-31T23:59:59-23:59"
    response = target.send("results", json.dumps(body))
    assert response.status_code == 422
    assert issue_of(response)["expression"] == ["acquired_at"]


def test_result_acquired_in_year_one_is_published_and_carded(target: Target) -> None:
    """In range is in range: year 1 must not break the FHIR Observation (``strftime`` wrote
    ``1-01-01``, which FHIR refuses: the publish was a 500)."""
    body = result_payload(patient_id="MRN-YEAR-1")
    body["acquired_at"] = "0001-01-01T00:00:00Z"
    assert target.send("results", json.dumps(body)).status_code == 201
    hook = hook_body(prefetch={"patient": patient_resource(mrn="MRN-YEAR-1"), "her2": None})
    answer = assert_clean(target.send("hook", json.dumps(hook)))
    (card,) = answer["cards"]
    assert "0001-01-01" in json.dumps(card)


def test_not_utf8_and_not_json_types_are_4xx(target: Target) -> None:
    body = json.dumps(target.valid_body("hook")).encode()
    assert target.send("hook", b"\xed\xa0\x80" + body).status_code == 400  # CESU surrogate
    client = target.service.app.test_client()
    token = make_token(target.service.url + SERVICE_PATH)
    response = client.post(
        SERVICE_PATH,
        data=body,
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 415 and issue_of(response)["code"] == "not-supported"


def test_fhir_server_answer_nested_too_deep_counts_as_unavailable(tmp_path: Path) -> None:
    """The EHR's FHIR server is read as strictly as a request body: 412, not a 500."""
    deep = '{"resourceType": "Patient", "id": "pat-1", "x": ' + "[" * 5000 + "]" * 5000 + "}"

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/fhir+json")])
        return [deep.encode()]

    fhir = make_server("127.0.0.1", 0, wsgi, threaded=True)
    threading.Thread(target=fhir.serve_forever, daemon=True).start()
    svc = start_service(tmp_path)
    try:
        base = f"http://127.0.0.1:{fhir.server_port}/fhir"
        body = hook_body(fhirServer=base)  # no prefetch: the patient is fetched
        response = svc.app.test_client().post(
            SERVICE_PATH,
            data=json.dumps(body),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {make_token(svc.url + SERVICE_PATH)}",
            },
        )
        assert response.status_code == 412, response.get_data(as_text=True)
        assert issue_of(response)["expression"] == ["prefetch.patient"]
    finally:
        stop_service(svc)
        fhir.shutdown()
        fhir.server_close()


def test_a_real_bug_is_a_500_without_detail_but_logged_with_its_place(
    target: Target, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The catch-all hides nothing from operators: class and file:line logged, values never."""
    import cds_service.hooks

    def broken(body: dict[str, Any]) -> Any:
        raise KeyError("MRN-SECRET-42")

    monkeypatch.setattr(cds_service.hooks, "parse_hook_request", broken)
    response = target.send("hook", json.dumps(target.valid_body("hook")))
    assert response.status_code == 500 and response.mimetype == "application/json"
    assert response.get_json()["issue"][0] == {
        "severity": "error",
        "code": "exception",
        "diagnostics": "internal error",
    }
    (record,) = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert record.exc_class == "KeyError"  # type: ignore[attr-defined]
    assert record.endpoint == "hooks.call"  # type: ignore[attr-defined]
    assert "test_cds_hostile_json.py:" in record.raised_at  # type: ignore[attr-defined]
    assert "MRN-SECRET" not in repr(vars(record))


# --- the reader's pieces --------------------------------------------------------------------


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    assert nesting_depth('{"a": "[[[[{{{{", "b": ["\\"[[[["]}') == 2
    assert nesting_depth("[" * 100_000) == 100_000  # no recursion involved
    assert nesting_depth('"unterminated [[[[') == 0
    parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH)  # the limit itself is accepted
    with pytest.raises(JsonInputError, match="deeper"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_parse_json_keeps_valid_surrogate_pairs_and_bounded_numbers() -> None:
    assert parse_json('["\\ud83d\\ude00", 9223372036854775807, 1e308]') == [
        "\U0001f600",
        2**63 - 1,
        1e308,
    ]
    with pytest.raises(JsonInputError) as refused:
        parse_json('{"a": [{"b\\ud800": 1}]}')
    assert refused.value.expression == "a.0"


def test_parse_timestamp_returns_utc_or_refuses() -> None:
    assert parse_timestamp("2026-11-25T12:00:00+02:00") == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert parse_timestamp("2026-11-25T10:00:00") == datetime(2026, 11, 25, 10, tzinfo=UTC)
    for bad in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:01", "soon", 1764064800):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


# --- properties: hostile values anywhere in a valid body ----------------------------------


def _hostile_anywhere(endpoint: str) -> Callable[..., None]:
    @PROPERTY
    @given(data=st.data())
    def check(target: Target, data: st.DataObject) -> None:
        body = target.valid_body(endpoint)
        path = data.draw(st.sampled_from(places(body)), label="path")
        raw = data.draw(hostile_raw, label="raw")
        assert_clean(target.send(endpoint, with_raw(body, path, raw)))

    return check


test_hook_survives_hostile_values = _hostile_anywhere("hook")
test_feedback_survives_hostile_values = _hostile_anywhere("feedback")
test_results_survive_hostile_values = _hostile_anywhere("results")
test_descriptors_survive_hostile_values = _hostile_anywhere("descriptors")


@PROPERTY
@given(when=timestamps)
def test_any_feedback_timestamp_is_stored_or_refused(target: Target, when: str) -> None:
    body = target.valid_body("feedback")
    body["feedback"][0]["outcomeTimestamp"] = when
    response = target.send("feedback", json.dumps(body))
    assert_clean(response)
    assert response.status_code in (200, 400)


@PROPERTY
@given(when=timestamps)
def test_any_acquired_at_is_stored_or_refused(target: Target, when: str) -> None:
    body = target.valid_body("results")
    body["acquired_at"] = when
    response = target.send("results", json.dumps(body))
    assert_clean(response)
    assert response.status_code in (200, 201, 422)
