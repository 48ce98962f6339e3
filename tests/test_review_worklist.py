"""The tumour-board worklist (issue 13 "Pages"): columns, filters, sorting, counts, states, the
board-date view, and no patient data in any URL of the page.

Flask's test client, signed in, against a fresh migrated database per test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from test_cds_support import (
    MASS_DESCRIPTORS,
    RESULTS_TOKEN,
    FakePredictor,
    csrf_token,
    result_payload,
)

from cds_service.accounts import Role
from cds_service.app import create_app
from cds_service.case_state import CaseFacts, CaseState, descriptors_complete, is_discordant
from cds_service.db import MIGRATIONS
from cds_service.review.worklist import display_name
from cds_service.store import Her2Pathology, PathologySource
from her2low.core.settings import Settings

PASSWORD = "correct horse battery staple"
HREF = re.compile(r'(?:href|action|src)="([^"]*)"')


def make_app(tmp_path: Path, **overrides: Any) -> Flask:
    settings = Settings(
        home=tmp_path,
        cds_db_url=f"sqlite:///{tmp_path / 'cds.db'}",
        cds_public_base_url="http://127.0.0.1:8080",
        results_api_token=RESULTS_TOKEN,
        cds_patient_id_systems={"HOSP": "urn:oid:1.2.3.4.5"},
        **overrides,
    )
    MIGRATIONS.upgrade(settings.cds_database_url)
    return create_app(settings, runtime=FakePredictor())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    flask_app = make_app(tmp_path)
    yield flask_app
    flask_app.extensions["her2low_cds"].engine.dispose()


def signed_in(app: Flask, role: Role, username: str = "") -> FlaskClient:
    name = username or f"dr-{role.value}"
    accounts = app.extensions["her2low_review"].accounts
    if accounts.user(name) is None:
        accounts.add_user(name, role, PASSWORD)
    client = app.test_client()
    page = client.get("/review/sign-in")
    signed = client.post(
        "/review/sign-in",
        data={"username": name, "password": PASSWORD, "csrf_token": csrf_token(page.text)},
    )
    assert signed.status_code == 303
    return client


def publish(
    app: Flask,
    *,
    mrn: str = "MRN-1",
    name: str | None = "DOE^JANE",
    study_date: str | None = "2026-11-25",
    **kwargs: Any,
) -> str:
    body = result_payload(patient_id=mrn, **kwargs)
    if name is not None:
        body["patient"]["name"] = name
    if study_date is not None:
        body["study_date"] = study_date
    response = app.test_client().post(
        "/api/v1/results", json=body, headers={"Authorization": f"Bearer {RESULTS_TOKEN}"}
    )
    assert response.status_code == 201, response.text
    return str(response.json["result_id"])  # type: ignore[index]


def store_of(app: Flask) -> Any:
    return app.extensions["her2low_cds"].store


def post(client: FlaskClient, url: str, data: dict[str, str]) -> Any:
    token = csrf_token(client.get("/review/").text)
    return client.post(url, data={**data, "csrf_token": token})


def rows_of(html: str) -> list[str]:
    """The case ids of the worklist's rows, in page order."""
    return re.findall(r'href="/review/cases/([0-9a-f-]{36})"', html)


# --- the state rules --------------------------------------------------------------------------


def test_state_rules() -> None:
    assert CaseState.derive(CaseFacts()) is CaseState.NEW
    assert CaseState.derive(CaseFacts(viewed=True)) is CaseState.DESCRIPTORS_NEEDED
    partial = CaseFacts(viewed=True, descriptors_entered=True, roi_confirmed=True)
    assert CaseState.derive(partial) is CaseState.DESCRIPTORS_NEEDED
    unconfirmed = CaseFacts(descriptors_entered=True, descriptors_complete=True)
    assert CaseState.derive(unconfirmed) is CaseState.DESCRIPTORS_NEEDED
    ready = CaseFacts(descriptors_entered=True, descriptors_complete=True, roi_confirmed=True)
    assert CaseState.derive(ready) is CaseState.READY_FOR_BOARD
    assert CaseState.derive(CaseFacts(decided=True)) is CaseState.DISCUSSED
    assert CaseState.derive(CaseFacts(decided=True, pathology_known=True)) is CaseState.CLOSED
    assert CaseState.derive(CaseFacts(withdrawn=True, decided=True)) is CaseState.CLOSED
    assert descriptors_complete(MASS_DESCRIPTORS)
    assert not descriptors_complete({"lesion_type": "mass", "mass_shape": "oval"})
    assert not descriptors_complete({})
    assert is_discordant(above_threshold=True, biopsy_her2_zero=True)
    assert not is_discordant(above_threshold=False, biopsy_her2_zero=True)
    assert not is_discordant(above_threshold=True, biopsy_her2_zero=False)
    assert display_name("DOE^JANE^M") == "DOE, JANE M" and display_name(None) == "—"


def test_states_follow_the_case(app: Flask) -> None:
    rid = publish(app)
    store = store_of(app)

    def current() -> str:
        return str(store.case(rid).result.state)

    assert current() == "new"
    radiologist = signed_in(app, Role.RADIOLOGIST, "dr-rad")
    radiologist.get(f"/review/cases/{rid}")
    assert current() == "descriptors-needed"
    assert (
        post(radiologist, f"/review/cases/{rid}/descriptors", MASS_DESCRIPTORS).status_code == 303
    )
    assert current() == "descriptors-needed"  # ROI not yet confirmed
    assert (
        post(radiologist, f"/review/cases/{rid}/roi", {"roi_confirmed": "yes"}).status_code == 303
    )
    assert current() == "ready-for-board"
    form = {"decision": "confirm", "reason": "retest-advised"}
    assert post(radiologist, f"/review/cases/{rid}/decision", form).status_code == 303
    assert current() == "discussed"
    store.add_pathology(
        rid,
        Her2Pathology.LOW,
        score="1+",
        source=PathologySource.PATHOLOGIST,
        source_key="p-1",
        entered_by="dr-path",
        reported_at=store.case(rid).result.acquired_at,
    )
    assert current() == "closed"


# --- columns, filters, sorting, counts ---------------------------------------------------------


def test_columns_show_whose_case_it_is(app: Flask) -> None:
    rid = publish(app, mrn="MRN-77", name="DOE^JANE")
    page = signed_in(app, Role.ONCOLOGIST).get("/review/").text
    for text in (
        "DOE, JANE",
        "MRN-77 (HOSP)",
        "A123",  # accession
        "2026-11-25",  # study date
        "left breast",
        "New",
        "fake-her2low",
        f'href="/review/cases/{rid}"',
    ):
        assert text in page, text
    for header in ("Patient", "MRN (issuer)", "Accession", "Study date", "Side", "Lesion"):
        assert f"{header}" in page
    assert "Likelihood HER2-low" in page and "State" in page and "Flags" in page


def test_older_payload_without_name_or_study_date(app: Flask) -> None:
    rid = publish(app, name=None, study_date=None)
    page = signed_in(app, Role.ONCOLOGIST).get("/review/").text
    assert rid in page and "2026-11-25" in page  # the acquisition date stands in


def test_filters_sorting_and_counts(app: Flask) -> None:
    a = publish(app, mrn="MRN-A", name="ALPHA^ANN", study_date="2026-10-01", adc_mean=0.0009)
    b = publish(app, mrn="MRN-B", name="BRAVO^BEA", study_date="2026-11-01", adc_mean=0.0012)
    c = publish(app, mrn="MRN-C", name="CHARLIE^CY", study_date="2026-12-01", adc_mean=0.0015)
    store = store_of(app)
    radiologist = signed_in(app, Role.RADIOLOGIST)
    post(radiologist, f"/review/cases/{b}/descriptors", MASS_DESCRIPTORS)
    post(radiologist, f"/review/cases/{b}/roi", {"roi_confirmed": "yes"})
    likelihood = {rid: store.case(rid).result.likelihood for rid in (a, b, c)}
    assert len(set(likelihood.values())) == 3, likelihood
    board = signed_in(app, Role.ONCOLOGIST)

    default = board.get("/review/").text
    assert rows_of(default) == [c, b, a]  # newest study first
    assert rows_of(board.get("/review/?sort=study-date&dir=asc").text) == [a, b, c]
    assert rows_of(board.get("/review/?sort=patient&dir=asc").text) == [a, b, c]
    by_likelihood = rows_of(board.get("/review/?sort=likelihood&dir=desc").text)
    assert by_likelihood == sorted(likelihood, key=lambda r: -likelihood[r])

    assert rows_of(board.get("/review/?since=2026-10-15&until=2026-11-30").text) == [b]
    assert rows_of(board.get("/review/?state=ready-for-board").text) == [b]
    assert rows_of(board.get("/review/?state=new").text) == [c, a]
    assert rows_of(board.get("/review/?lesion=mass").text) == [b]
    assert rows_of(board.get("/review/?lesion=unknown").text) == [c, a]
    for band in ("0-25", "25-50", "50-75", "75-100"):
        low, high = (int(x) / 100 for x in band.split("-"))
        expected = [
            r for r in (c, b, a) if low <= likelihood[r] and (likelihood[r] < high or high == 1.0)
        ]
        assert rows_of(board.get(f"/review/?band={band}").text) == expected, band

    # counts per state, with the other filters applied
    page = board.get("/review/?state=new").text
    assert "2 cases match" in page
    assert "New: <strong>2</strong>" in page and "Ready for board: <strong>1</strong>" in page
    since = board.get("/review/?since=2026-11-15").text
    assert "New: <strong>1</strong>" in since and "Ready for board: <strong>0</strong>" in since

    # bad values are reported and ignored, never guessed
    bad = board.get("/review/?since=yesterday&band=most&sort=name")
    assert bad.status_code == 200
    assert "is not a date" in bad.text and "Likelihood band" in bad.text and "Sort" in bad.text
    assert rows_of(bad.text) == [c, b, a]


def test_discordant_only(app: Flask) -> None:
    plain = publish(app, mrn="MRN-P", adc_mean=0.0009)
    flagged = publish(app, mrn="MRN-D", adc_mean=0.0009)
    store = store_of(app)
    store.audit("ehr-user", "discordance-detected", flagged)  # what a hook call records
    store.record_call(None, [("ehr-user", "discordance-detected", flagged, None)])
    board = signed_in(app, Role.ONCOLOGIST)
    page = board.get("/review/?discordant=1").text
    assert rows_of(page) == [flagged]
    assert "Discordant: biopsy HER2 0 vs MRI HER2-low" in page
    assert plain in board.get("/review/").text


def test_pathology_her2_zero_above_threshold_is_discordant(app: Flask) -> None:
    rid = publish(app)
    store = store_of(app)
    above = bool(store.case(rid).result.above_threshold)
    store.add_pathology(
        rid,
        Her2Pathology.ZERO,
        score="0",
        source=PathologySource.PATHOLOGIST,
        source_key="p-0",
        entered_by="dr-path",
        reported_at=store.case(rid).result.acquired_at,
    )
    assert store.case(rid).result.discordant is above


def test_board_date_view(app: Flask) -> None:
    on_board = publish(app, mrn="MRN-1")
    other = publish(app, mrn="MRN-2")
    coordinator = signed_in(app, Role.COORDINATOR)
    response = post(
        coordinator, f"/review/cases/{on_board}/board-date", {"board_date": "2026-12-08"}
    )
    assert response.status_code == 303
    page = coordinator.get("/review/").text
    assert 'href="/review/?board=2026-12-08' in page and "2026-12-08</a> (1)" in page
    board = coordinator.get("/review/?board=2026-12-08").text
    assert "Tumour board 2026-12-08" in board
    assert rows_of(board) == [on_board] and other not in board
    trail = [(a.actor, a.action) for a in store_of(app).audit_for(on_board)]
    assert ("dr-board-coordinator", "board-date-set") in trail
    bad = post(coordinator, f"/review/cases/{on_board}/board-date", {"board_date": "soon"})
    assert bad.status_code == 422 and "is not a date" in bad.text
    pathologist = signed_in(app, Role.PATHOLOGIST)
    forbidden = post(pathologist, f"/review/cases/{other}/board-date", {"board_date": "2026-12-08"})
    assert forbidden.status_code == 403


def test_paging(app: Flask) -> None:
    from cds_service.review import worklist

    ids = [publish(app, mrn=f"MRN-{k}") for k in range(5)]
    old = worklist.PAGE_SIZE
    worklist.PAGE_SIZE = 2
    try:
        board = signed_in(app, Role.ONCOLOGIST)
        first = board.get("/review/").text
        assert len(rows_of(first)) == 2 and "5 cases match" in first
        assert 'rel="next"' in first and 'href="/review/?page=2"' in first
        third = board.get("/review/?page=3").text
        assert len(rows_of(third)) == 1 and 'rel="prev"' in third
        seen = rows_of(first) + rows_of(board.get("/review/?page=2").text) + rows_of(third)
        assert sorted(seen) == sorted(ids)
    finally:
        worklist.PAGE_SIZE = old


# --- no patient data in URLs or logs -------------------------------------------------------------


def test_no_phi_in_any_url_of_the_pages(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    rid = publish(app, mrn="MRN-SECRET-9", name="SECRETNAME^PAT", previews=True)
    radiologist = signed_in(app, Role.RADIOLOGIST)
    post(radiologist, f"/review/cases/{rid}/board-date", {"board_date": "2026-12-08"})
    pages = {
        "/review/": radiologist.get("/review/").text,
        "/review/?sort=patient&dir=asc&state=new": radiologist.get(
            "/review/?sort=patient&dir=asc&state=new"
        ).text,
        f"/review/cases/{rid}": radiologist.get(f"/review/cases/{rid}").text,
    }
    for path, html in pages.items():
        assert "MRN-SECRET-9" in html and "SECRETNAME" in html, path  # shown to a signed-in user
        urls = HREF.findall(html)
        assert urls, path
        for url in urls:
            assert "MRN" not in url and "SECRET" not in url.upper(), (path, url)
    assert "MRN-SECRET-9" not in caplog.text and "SECRETNAME" not in caplog.text
    anonymous = app.test_client().get("/review/")
    assert anonymous.status_code == 303 and "MRN-SECRET-9" not in anonymous.text


# --- the node publishes name and study date (optional, backwards compatible) ---------------------


def test_contract_patient_name_and_study_date_optional() -> None:
    import datetime as dt

    from pydicom.dataset import Dataset

    from dicom_node.jobs.pipeline import _study_date
    from models.contract import ResultPayload

    old = result_payload()
    parsed = ResultPayload.model_validate(old)
    assert parsed.patient.name is None and parsed.study_date is None
    body = parsed.to_json()
    assert "study_date" not in body and "name" not in body["patient"]  # hashes as before
    new = {**old, "study_date": "2026-11-24", "patient": {**old["patient"], "name": "DOE^JANE"}}
    parsed = ResultPayload.model_validate(new)
    assert parsed.study_date == dt.date(2026, 11, 24) and parsed.patient.name == "DOE^JANE"
    assert parsed.to_json()["study_date"] == "2026-11-24"
    ds = Dataset()
    assert _study_date(ds) is None
    ds.StudyDate = "20261124"
    assert _study_date(ds) == dt.date(2026, 11, 24)
    ds.StudyDate = "2026112X"
    assert _study_date(ds) is None
