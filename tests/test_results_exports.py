"""Results in the PACS, service side (issue 14): the node's export states in
(``PUT /api/v1/exports``), the service's assessments out (``GET /api/v1/assessments``), and the
review case page's "Results in the PACS" section.

Flask's test client against a fresh migrated SQLite database per test (the real app and its
error handlers); the bodies are the ``models.contract`` classes the node uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from test_cds_support import MASS_DESCRIPTORS, RESULTS_TOKEN, FakePredictor, result_payload
from test_review_worklist import make_app, signed_in, store_of

from cds_service.accounts import Role
from cds_service.app import create_app
from cds_service.db import MIGRATIONS
from cds_service.fhir import NOTE_REFERENCE
from cds_service.orm import Base, PredictionRow
from cds_service.store.tables import PREDICTIONS
from her2low.core.database import make_engine
from her2low.core.settings import Settings
from models.contract import PIPELINE_VERSION, AssessmentPage, ExportReport, ExportState

AUTH = {"Authorization": f"Bearer {RESULTS_TOKEN}"}
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    flask_app = make_app(tmp_path)
    yield flask_app
    flask_app.extensions["her2low_cds"].engine.dispose()


def _publish(client: FlaskClient, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    body = result_payload(**kwargs)
    response = client.post("/api/v1/results", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return str(response.json["result_id"]), body  # type: ignore[index]


def _status(
    destination: str = "PACS-MAIN",
    state: str = "done",
    *,
    at: datetime = T0,
    attempts: int = 1,
    error: str = "",
) -> dict[str, Any]:
    return {
        "destination": destination,
        "state": state,
        "attempts": attempts,
        "objects": 5,
        "last_error": error,
        "updated_at": at.isoformat(),
        "sent_at": at.isoformat() if state == "done" else None,
    }


def _report(body: dict[str, Any], *statuses: dict[str, Any]) -> dict[str, Any]:
    return {
        "api_version": 1,
        "series_instance_uid": body["series_instance_uid"],
        "pipeline_version": body["pipeline_version"],
        "exports": list(statuses),
    }


def _put(client: FlaskClient, report: Any, **kwargs: Any) -> Any:
    return client.put("/api/v1/exports", json=report, headers=kwargs.pop("headers", AUTH))


def _outcome(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert response.mimetype == "application/json"
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    return dict(body["issue"][0])


# --- PUT /api/v1/exports ----------------------------------------------------------------------


def test_export_report_is_stored_and_answered_with_the_stored_states(app: Flask) -> None:
    client = app.test_client()
    rid, body = _publish(client)
    sending = _status("PACS-B", "sending", attempts=2, error="timeout after 30 s")
    response = _put(client, _report(body, _status("PACS-A"), sending))
    assert response.status_code == 200, response.text
    answer = ExportReport.model_validate(response.get_json())  # the node can read it back
    assert answer.series_instance_uid == body["series_instance_uid"]
    assert [(e.destination, e.state, e.attempts) for e in answer.exports] == [
        ("PACS-A", ExportState.DONE, 1),
        ("PACS-B", ExportState.SENDING, 2),
    ]
    stored = store_of(app).pacs.exports_for(rid)
    assert stored == list(answer.exports)
    assert stored[1].last_error == "timeout after 30 s" and stored[0].sent_at == T0


def test_a_newer_report_replaces_an_older_one_is_ignored(app: Flask) -> None:
    client = app.test_client()
    rid, body = _publish(client)
    later = T0 + timedelta(minutes=5)
    _put(client, _report(body, _status("PACS-A", "sending", at=T0), _status("PACS-B", at=T0)))
    # PACS-A moves on; PACS-B is not named and keeps its state
    response = _put(client, _report(body, _status("PACS-A", "dead", at=later, attempts=5)))
    assert response.status_code == 200
    states = {e.destination: e for e in store_of(app).pacs.exports_for(rid)}
    assert states["PACS-A"].state is ExportState.DEAD and states["PACS-A"].attempts == 5
    assert states["PACS-B"].state is ExportState.DONE
    # an older report delivered late changes nothing, but is answered with the stored states
    stale = _put(client, _report(body, _status("PACS-A", "sending", at=T0, attempts=1)))
    assert stale.status_code == 200
    answered = {e["destination"]: e["state"] for e in stale.get_json()["exports"]}
    assert answered == {"PACS-A": "dead", "PACS-B": "done"}
    # the same report again (equal updated_at) is idempotent; a retry that succeeded replaces
    assert _put(client, _report(body, _status("PACS-A", "dead", at=later))).status_code == 200
    done = _put(client, _report(body, _status("PACS-A", "done", at=later + timedelta(seconds=1))))
    assert {e["destination"]: e["state"] for e in done.get_json()["exports"]}["PACS-A"] == "done"
    assert len(store_of(app).pacs.exports_for(rid)) == 2


def test_a_destination_named_twice_keeps_its_newest_state(app: Flask) -> None:
    client = app.test_client()
    rid, body = _publish(client)
    newer = _status("PACS-A", "done", at=T0 + timedelta(seconds=1))
    _put(client, _report(body, newer, _status("PACS-A", "sending", at=T0)))
    (only,) = store_of(app).pacs.exports_for(rid)
    assert only.state is ExportState.DONE


def test_unknown_series_or_pipeline_is_a_404(app: Flask) -> None:
    client = app.test_client()
    _, body = _publish(client)
    unknown = _put(client, _report(dict(body, series_instance_uid="1.2.3.999"), _status()))
    assert unknown.status_code == 404 and "1.2.3.999" in _outcome(unknown)["diagnostics"]
    other_pipeline = _put(client, _report(dict(body, pipeline_version="dki-9"), _status()))
    assert other_pipeline.status_code == 404 and _outcome(other_pipeline)["code"] == "not-found"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"api_version": 2}, "api_version"),
        ({"api_version": True}, "api_version"),
        ({"series_instance_uid": "not-a-uid"}, "series_instance_uid"),
        ({"exports": [dict(_status(), state="lost")]}, "exports.0.state"),
        ({"exports": [dict(_status(), attempts=-1)]}, "exports.0.attempts"),
        ({"exports": [dict(_status(), attempts="3")]}, "exports.0.attempts"),
        ({"exports": [dict(_status(), updated_at="yesterday")]}, "exports.0.updated_at"),
        ({"exports": [dict(_status(), last_error="x" * 501)]}, "exports.0.last_error"),
        ({"exports": [dict(_status(), colour="red")]}, "exports.0.colour"),
        ({"exports": [_status(f"D{i}") for i in range(33)]}, "exports"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_contract_violations_are_a_422_naming_the_field(
    app: Flask, change: dict[str, Any], field: str
) -> None:
    client = app.test_client()
    _, body = _publish(client)
    response = _put(client, {**_report(body, _status()), **change})
    assert response.status_code == 422, response.text
    issue = _outcome(response)
    assert issue["expression"] == [field], issue


def test_not_json_is_a_4xx_outcome(app: Flask) -> None:
    client = app.test_client()
    for data, content_type, code in (
        (b"{", "application/json", 400),
        (b'{"api_version": NaN}', "application/json", 400),
        (b"[]", "application/json", 400),
        (b"api_version=1", "application/x-www-form-urlencoded", 415),
    ):
        response = client.put(
            "/api/v1/exports", data=data, headers={**AUTH, "Content-Type": content_type}
        )
        assert response.status_code == code, (data, response.text)
        _outcome(response)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + RESULTS_TOKEN, "Bearer "])
def test_wrong_token_is_a_401(app: Flask, header: str | None) -> None:
    client = app.test_client()
    _, body = _publish(client)
    headers = {"Authorization": header} if header else {}
    put = _put(client, _report(body, _status()), headers=headers)
    get = client.get("/api/v1/assessments", headers=headers)
    for response in (put, get):
        assert response.status_code == 401 and _outcome(response)["code"] == "login"
        assert response.headers["WWW-Authenticate"] == "Bearer"


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_SERIES = "1.2.3.4.100"
_FIELDS = ("destination", "state", "attempts", "objects", "last_error", "updated_at", "sent_at")


@st.composite
def _junk_reports(draw: st.DrawFn) -> bytes:
    """Raw bytes, any JSON, or a valid report with some fields replaced, dropped or added."""
    kind = draw(st.sampled_from(("bytes", "json", "mutated")))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(_JSON)).encode()
    report: dict[str, Any] = _report(
        {"series_instance_uid": _SERIES, "pipeline_version": PIPELINE_VERSION}, _status()
    )
    status = report["exports"][0]
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        action = draw(st.sampled_from(("replace", "drop")))
        if action == "drop":
            status.pop(name, None)
        else:
            status[name] = draw(_JSON)
    for name in draw(st.lists(st.sampled_from(tuple(report)), max_size=2, unique=True)):
        report[name] = draw(_JSON)
    if draw(st.booleans()):
        report[draw(st.text(min_size=1, max_size=8))] = draw(_JSON)
    return json.dumps(report).encode()


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=_junk_reports())
def test_junk_bodies_are_a_4xx_outcome_never_a_5xx(app: Flask, data: bytes) -> None:
    client = app.test_client()
    if not store_of(app).results_for_study(None):  # the series the mutated reports name
        client.post("/api/v1/results", json=result_payload(series=_SERIES), headers=AUTH)
    response = client.put(
        "/api/v1/exports", data=data, headers={**AUTH, "Content-Type": "application/json"}
    )
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code == 200:  # mutated into another valid report of the known result
        ExportReport.model_validate(response.get_json())
    else:
        assert 400 <= response.status_code < 500
        _outcome(response)


# --- GET /api/v1/assessments ------------------------------------------------------------------


def _assessments(client: FlaskClient, **params: Any) -> AssessmentPage:
    response = client.get("/api/v1/assessments", query_string=params, headers=AUTH)
    assert response.status_code == 200, response.text
    return AssessmentPage.model_validate(response.get_json())


def test_assessments_page_by_since_and_until(app: Flask) -> None:
    client = app.test_client()
    ids = [_publish(client)[0] for _ in range(5)]
    first = _assessments(client, limit=2)
    assert [a.result_id for a in first.assessments] == ids[:2]
    assert first.until == first.assessments[-1].computed_at
    second = _assessments(client, since=first.until.isoformat(), limit=2)
    third = _assessments(client, since=second.until.isoformat(), limit=2)
    assert [a.result_id for a in second.assessments + third.assessments] == ids[2:]
    empty = _assessments(client, since=third.until.isoformat())
    assert empty.assessments == () and empty.until == third.until  # poll again from here
    assert len(_assessments(client).assessments) == 5  # default limit 100, from the first
    # a recomputed case comes again, once, with its current prediction
    response = client.put(
        f"/api/v1/cases/{ids[0]}/descriptors",
        json={"values": MASS_DESCRIPTORS, "roi_confirmed": True, "entered_by": "dr-rad"},
        headers=AUTH,
    )
    assert response.status_code == 200
    again = _assessments(client, since=third.until.isoformat())
    (revised,) = again.assessments
    assert revised.result_id == ids[0] and revised.descriptors_version == 1
    assert revised.descriptors == MASS_DESCRIPTORS
    everything = _assessments(client, limit=500)
    assert [a.result_id for a in everything.assessments] == [*ids[1:], ids[0]]
    assert _assessments(client).until <= datetime.now(UTC)


def test_page_never_ends_inside_a_tie(app: Flask) -> None:
    client = app.test_client()
    a, b, c = (_publish(client)[0] for _ in range(3))
    tie = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    store = store_of(app)
    with store.engine.begin() as conn:
        conn.execute(
            update(PREDICTIONS)
            .where(PREDICTIONS.c.result_id == a)
            .values(computed_at=tie - timedelta(seconds=1))
        )
        conn.execute(
            update(PREDICTIONS).where(PREDICTIONS.c.result_id.in_([b, c])).values(computed_at=tie)
        )
    first = _assessments(client, limit=2)
    assert [x.result_id for x in first.assessments] == [a]  # b and c wait for the next poll
    second = _assessments(client, since=first.until.isoformat(), limit=1)  # tie longer than a page
    assert {x.result_id for x in second.assessments} == {b, c} and second.until == tie
    assert _assessments(client, since=second.until.isoformat()).assessments == ()


def test_descriptors_are_the_version_the_prediction_used(app: Flask) -> None:
    client = app.test_client()
    rid, _ = _publish(client)
    client.put(
        f"/api/v1/cases/{rid}/descriptors",
        json={"values": MASS_DESCRIPTORS, "roi_confirmed": True, "entered_by": "dr-rad"},
        headers=AUTH,
    )
    # a newer version stored without a recomputation: the current prediction still used v1
    store_of(app).add_descriptors(rid, {**MASS_DESCRIPTORS, "mass_shape": "oval"}, True, "dr-2")
    (a,) = _assessments(client).assessments
    assert a.descriptors_version == 1 and a.descriptors["mass_shape"] == "irregular"
    assert a.revision == 1 and a.probability is not None and 0 <= a.probability <= 1
    assert a.model_name == "fake-her2low (combined)" and a.model_version == "0.0-test"
    assert a.not_scored == ()


def test_no_descriptors_is_an_empty_mapping(app: Flask) -> None:
    client = app.test_client()
    _publish(client)
    (a,) = _assessments(client).assessments
    assert a.descriptors == {} and a.descriptors_version is None
    assert a.model_name == "fake-her2low (quantitative)"


def test_reference_model_statement_is_the_cards_one(app: Flask) -> None:
    client = app.test_client()
    _publish(client)
    (a,) = _assessments(client).assessments
    assert a.clinically_validated is False
    assert a.statement == NOTE_REFERENCE == "Reference model, not clinically validated."


class _SiteModel(FakePredictor):
    """A site's own model: its card does not carry the reference flag."""

    def predict(self, inputs: Any, *, conventions: Any = None) -> Any:
        return replace(super().predict(inputs, conventions=conventions), reference=False)


def test_a_site_model_carries_no_reference_statement(tmp_path: Path) -> None:
    settings_ = Settings(
        home=tmp_path,
        cds_db_url=f"sqlite:///{tmp_path / 'cds.db'}",
        cds_public_base_url="http://127.0.0.1:8080",
        results_api_token=RESULTS_TOKEN,
        cds_patient_id_systems={"HOSP": "urn:oid:1.2.3.4.5"},
    )
    MIGRATIONS.upgrade(settings_.cds_database_url)
    site = create_app(settings_, runtime=_SiteModel())
    try:
        client = site.test_client()
        _publish(client)
        (a,) = _assessments(client).assessments
        assert a.clinically_validated is True and a.statement == ""
    finally:
        site.extensions["her2low_cds"].engine.dispose()


def test_not_scored_cases_say_why(app: Flask) -> None:
    client = app.test_client()
    qc_body = result_payload()
    qc_body["provenance"]["qc"].update({"high_b": 2000, "snr_high_b": 1.0})
    assert client.post("/api/v1/results", json=qc_body, headers=AUTH).status_code == 201
    mismatch = result_payload()
    mismatch["provenance"]["statistics"]["kurtosis"] = "pearson"
    assert client.post("/api/v1/results", json=mismatch, headers=AUTH).status_code == 201
    qc, other = _assessments(client).assessments
    for a in (qc, other):
        assert a.probability is None and a.model_name is None and a.model_version is None
        assert a.not_scored and a.statement == "" and a.clinically_validated is False
    assert any("SNR" in reason for reason in qc.not_scored), qc.not_scored
    assert "kurtosis" in other.not_scored[0], other.not_scored


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-13-01T00:00:00Z"}, "since"),
        ({"since": "9999-12-31T23:59:59-23:59"}, "since"),  # overflows in UTC
        ({"since": "2026-12-01T10:00:00 00:00"}, "since"),  # an unencoded "+"
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e2"}, "limit"),
        ({"limit": "9" * 400}, "limit"),
        ({"limit": "٣"}, "limit"),  # a non-ASCII digit
    ],
)
def test_bad_since_or_limit_is_a_400(app: Flask, params: dict[str, str], name: str) -> None:
    response = app.test_client().get("/api/v1/assessments", query_string=params, headers=AUTH)
    assert response.status_code == 400, response.text
    assert _outcome(response)["expression"] == [name]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(since=st.text(max_size=40), limit=st.text(max_size=6))
def test_any_query_is_answered_or_refused_with_a_400(app: Flask, since: str, limit: str) -> None:
    response = app.test_client().get(
        "/api/v1/assessments", query_string={"since": since, "limit": limit}, headers=AUTH
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        _outcome(response)


# --- schema -----------------------------------------------------------------------------------


def test_migrations_match_the_models(tmp_path: Path) -> None:
    """0005_pacs_exports builds what cds_service.orm declares (tables, columns, indexes)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'cds.db'}"
    MIGRATIONS.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = [
                d
                for d in compare_metadata(context, Base.metadata)
                if not (d[0] == "remove_table" and d[1].name == "alembic_version")
            ]
    finally:
        engine.dispose()
    assert diff == [], diff
    assert "pacs_exports" in Base.metadata.tables
    assert any(i.name == "ix_predictions_computed" for i in PredictionRow.__table__.indexes)


# --- the review case page ---------------------------------------------------------------------


def test_case_page_shows_a_dead_destination_with_its_error(app: Flask) -> None:
    client = app.test_client()
    rid, body = _publish(client)
    error = "association rejected: <script>alert(1)</script> & AE unknown"
    later = T0 + timedelta(minutes=2)
    dead = _status("PACS-MAIN", "dead", at=later, attempts=5, error=error)
    assert _put(client, _report(body, dead, _status("ARCHIVE", at=T0))).status_code == 200
    # behind sign-in like the rest of the page
    anonymous = app.test_client().get(f"/review/cases/{rid}")
    assert anonymous.status_code in (302, 303) and "PACS-MAIN" not in anonymous.text
    page = signed_in(app, Role.ONCOLOGIST).get(f"/review/cases/{rid}")
    assert page.status_code == 200
    html = page.text
    assert 'id="pacs"' in html and "Results in the PACS" in html
    assert 'id="pacs-dead-banner"' in html and 'id="pacs-dead-1"' in html
    assert "Not delivered to PACS-MAIN" in html and "after 5 attempts" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; AE unknown" in html
    assert "<script>alert(1)" not in html
    assert "her2low export list" in html and "her2low export retry ID" in html
    assert "her2low export retry --all" in html
    assert "ARCHIVE" in html and "in the PACS" in html
    assert html.index('id="pacs-dead-banner"') < html.index('id="likelihood"')  # prominent


def test_case_page_says_not_reported_without_a_report(app: Flask) -> None:
    rid, _ = _publish(app.test_client())
    html = signed_in(app, Role.RADIOLOGIST).get(f"/review/cases/{rid}").text
    assert 'id="pacs"' in html and "Not reported" in html
    assert "pacs-dead" not in html
