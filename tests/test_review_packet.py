"""The tumour-board meeting packet (issue 13): a PDF read back by its text, audited."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import requests
from pypdf import PdfReader
from test_cds_support import ReviewClient, Service, result_payload, start_service, stop_service

from cds_service.audit import AuditAction
from cds_service.orm import AuditEvent
from cds_service.store import AuditQuery, Her2Pathology, PathologySource

BOARD = "2026-12-08"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


def _publish(service: Service, mrn: str, adc: float) -> str:
    body = result_payload(patient_id=mrn, adc_mean=adc, previews=True)
    answer = service.publish(body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["result_id"])


def _text(pdf: bytes) -> tuple[list[str], PdfReader]:
    reader = PdfReader(io.BytesIO(pdf))
    pages = [re.sub(r"\s+", " ", page.extract_text() or "") for page in reader.pages]
    return pages, reader


def test_packet_pdf_lists_cases_and_has_a_page_each(service: Service) -> None:
    first = _publish(service, "MRN-PKT-1", 0.0008)
    second = _publish(service, "MRN-PKT-2", 0.0014)
    store = service.app.extensions["her2low_cds"].store
    store.add_pathology(
        first,
        Her2Pathology.LOW,
        score="1+",
        source=PathologySource.PATHOLOGIST,
        source_key="t1",
        entered_by="dr-path",
        reported_at=datetime(2026, 11, 30, tzinfo=UTC),
    )
    client = ReviewClient(service, "board-coordinator")
    form = client.get(service.url + "/review/packet")
    assert form.status_code == 200 and "MRN-PKT-1" in form.text
    answer = client.post(
        service.url + "/review/packet", {"case": [first, second], "board_date": BOARD}
    )
    assert answer.status_code == 200, answer.text[:500]
    assert answer.headers["Content-Type"] == "application/pdf"
    assert f"tumour-board-{BOARD}.pdf" in answer.headers["Content-Disposition"]
    assert "no-store" in answer.headers.get("Cache-Control", "")
    pages, reader = _text(answer.content)
    assert len(pages) == 3  # the list, then one page per case
    cover = pages[0]
    assert f"Tumour board {BOARD}" in cover
    assert "MRN-PKT-1" in cover and "MRN-PKT-2" in cover
    assert "Reference model, not clinically validated" in cover
    assert "by dr-board-coordinator" in cover
    for page, mrn in zip(pages[1:], ("MRN-PKT-1", "MRN-PKT-2"), strict=True):
        assert mrn in page
        assert "Likelihood of HER2-low" in page and re.search(r"\d+ %", page)
        assert "Reference model, not clinically validated" in page
        assert "Operating threshold" in page
        assert "ADC mean" in page or "adc" in page.lower()
    assert "HER2-low (1+" in pages[1]
    assert "Pathology HER2: not known" in pages[2]
    assert all(len(reader.pages[k].images) >= 1 for k in (1, 2))  # the stored previews
    (event,) = store.audit_events(AuditQuery(action=AuditAction.PACKET_EXPORTED))
    assert event.actor == "dr-board-coordinator"
    assert event.detail == {"board_date": BOARD, "cases": [first, second]}


def test_board_date_preselects_its_cases(service: Service) -> None:
    first = _publish(service, "MRN-BRD-1", 0.0009)
    other = _publish(service, "MRN-BRD-2", 0.0009)
    store = service.app.extensions["her2low_cds"].store
    store.set_board_date(first, date.fromisoformat(BOARD), "dr-coordinator")
    client = ReviewClient(service, "board-coordinator")
    page = client.get(service.url + f"/review/packet?board_date={BOARD}").text
    assert re.search(rf'value="{first}"[^>]*checked', page)
    assert other not in page
    assert BOARD in page


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"board_date": BOARD}, "Choose at least one case"),
        ({"board_date": "next tuesday", "case": ["x"]}, "YYYY-MM-DD"),
        ({"board_date": "2026-02-30", "case": ["x"]}, "YYYY-MM-DD"),
        ({"board_date": BOARD, "case": ["no-such-case"]}, "None of the chosen cases"),
    ],
)
def test_packet_form_errors(service: Service, data: dict[str, object], message: str) -> None:
    client = ReviewClient(service, "oncologist")
    answer = client.post(service.url + "/review/packet", data)
    assert answer.status_code == 422
    assert message in answer.text
    assert not service.app.extensions["her2low_cds"].store.audit_events(
        AuditQuery(action=AuditAction.PACKET_EXPORTED)
    )


def test_packet_refused_without_sign_in_or_csrf(service: Service) -> None:
    rid = _publish(service, "MRN-ANON", 0.0009)
    anon = requests.post(
        service.url + "/review/packet",
        data={"case": rid, "board_date": BOARD},
        timeout=10,
        allow_redirects=False,
    )
    assert anon.status_code in (302, 303, 400, 403)
    client = ReviewClient(service, "oncologist")
    no_token = client.post_raw(service.url + "/review/packet", {"case": rid, "board_date": BOARD})
    assert no_token.status_code == 400
    assert b"%PDF" not in anon.content + no_token.content
    with service.app.extensions["her2low_cds"].store.sessions() as s:
        assert not s.query(AuditEvent).filter_by(action=AuditAction.PACKET_EXPORTED).count()
