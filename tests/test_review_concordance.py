"""Concordance (issue 13): pathology HER2 entered by a pathologist or received from the EHR,
estimates against it by band, a server-drawn calibration plot, feature drift per scanner."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from test_cds_support import (
    ReviewClient,
    Service,
    hook_body,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)

from cds_service.audit import AuditAction
from cds_service.biopsy import BiopsyHer2, BiopsyReading
from cds_service.pathology import classify_reading, classify_text
from cds_service.review.concordance import band_counts, calibration_bins, drift
from cds_service.store import AuditQuery, ConcordanceRow, Her2Pathology, PathologySource

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


def _publish(service: Service, mrn: str, *, adc: float = 0.00095, **extra: Any) -> str:
    body = result_payload(patient_id=mrn, adc_mean=adc)
    if "scanner" in extra:
        body["provenance"]["scanner"] = extra["scanner"]
    if "kapp_mean" in extra:
        body["features"]["kapp_mean"] = extra["kapp_mean"]
    answer = service.publish(body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["result_id"])


def _her2(text: str, day: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "48676-1"}]},
                    "subject": {"reference": "Patient/pat-1"},
                    "effectiveDateTime": day,
                    "valueCodeableConcept": {"text": text},
                }
            }
        ],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("IHC 3+", (Her2Pathology.POSITIVE, "3+")),
        ("Score 2+, ISH not amplified", (Her2Pathology.LOW, "2+ ISH-")),
        ("2+ (FISH amplified)", (Her2Pathology.POSITIVE, "2+ ISH+")),
        ("IHC 1+", (Her2Pathology.LOW, "1+")),
        ("2+", None),  # equivocal without ISH: not a result
        ("see report", None),
    ],
)
def test_classify_text(text: str, expected: tuple[Her2Pathology, str] | None) -> None:
    assert classify_text(text) == expected


def test_classify_reading_zero_and_unknown() -> None:
    zero = BiopsyReading(BiopsyHer2.ZERO, "48676-1", "Negative (0)", "2026-12-01")
    assert classify_reading(zero) == (Her2Pathology.ZERO, "0")
    assert classify_reading(BiopsyReading(BiopsyHer2.UNKNOWN)) is None


def test_pathologist_enters_result_others_cannot(service: Service) -> None:
    rid = _publish(service, "MRN-PATH")
    url = f"{service.url}/review/cases/{rid}/pathology"
    radiologist = ReviewClient(service, "radiologist")
    assert "Record the pathology result" not in radiologist.get(url).text
    refused = radiologist.post(url, {"her2": "1+", "reported": "2026-11-30"})
    assert refused.status_code == 403
    pathologist = ReviewClient(service, "pathologist")
    assert pathologist.post(url, {"her2": "5+", "reported": "2026-11-30"}).status_code == 422
    future = pathologist.post(url, {"her2": "1+", "reported": "2999-01-01"})
    assert future.status_code == 422 and "not in the future" in future.text
    saved = pathologist.post(
        url, {"her2": "2+ish-", "reported": "2026-11-30", "comment": "core biopsy"}
    )
    assert saved.status_code == 200  # after the 303 back to the page
    assert "HER2-low" in saved.text and "2+ ISH-" in saved.text and "dr-pathologist" in saved.text
    store = service.app.extensions["her2low_cds"].store
    (report,) = store.pathology_for(rid)
    assert (report.her2, report.score, report.source) == ("low", "2+ ISH-", "pathologist")
    (event,) = store.audit_events(AuditQuery(action=AuditAction.PATHOLOGY_ENTERED))
    assert event.actor == "dr-pathologist" and event.result_id == rid


def test_later_her2_observation_from_the_ehr_is_kept_once(service: Service) -> None:
    rid = _publish(service, "MRN-1")  # acquired 2026-11-25
    store = service.app.extensions["her2low_cds"].store
    before = hook_body(prefetch={"patient": patient_resource(), "her2": _her2("3+", "2026-11-01")})
    assert service.post_hook(before).status_code == 200
    assert store.pathology_for(rid) == []  # the biopsy the MRI was read against
    later = {
        "patient": patient_resource(),
        "her2": _her2("IHC 2+, ISH not amplified", "2026-12-01"),
    }
    attempts: list[str] = []

    def count_inserts(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO pathology_results"):
            attempts.append(statement)

    engine = service.app.extensions["her2low_cds"].engine
    event.listen(engine, "before_cursor_execute", count_inserts)
    try:
        for _ in range(3):
            assert service.post_hook(hook_body(prefetch=later)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count_inserts)
    (report,) = store.pathology_for(rid)
    assert (report.her2, report.score, report.source) == ("low", "2+ ISH-", PathologySource.EHR)
    assert report.reported_at == datetime(2026, 12, 1, tzinfo=UTC)
    # the same result in every later call's prefetch is not offered to the database again
    assert len(attempts) == 1


def _row(p: float | None, her2: Her2Pathology) -> ConcordanceRow:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return ConcordanceRow("r", now, p, None, her2, "", now, {}, {})


def test_bands_and_calibration_numbers() -> None:
    rows = [
        _row(0.1, Her2Pathology.ZERO),
        _row(0.15, Her2Pathology.LOW),
        _row(0.8, Her2Pathology.LOW),
        _row(0.9, Her2Pathology.LOW),
        _row(1.0, Her2Pathology.POSITIVE),
        _row(None, Her2Pathology.LOW),
    ]
    bands = band_counts(rows)
    assert [b["n"] for b in bands] == [2, 0, 0, 3]
    assert (bands[0]["zero"], bands[0]["low"], bands[3]["low"], bands[3]["positive"]) == (
        1,
        1,
        2,
        1,
    )
    bins = calibration_bins(rows)
    assert [b.n for b in bins] == [2, 3]
    assert bins[0].observed_low == pytest.approx(0.5)
    assert bins[1].observed_low == pytest.approx(2 / 3)


def test_drift_flags_a_scanner_outside_the_training_range() -> None:
    ranges = {"kapp_mean": (0.7, 1.1)}
    scanner = {"manufacturer": "ACME", "model": "X1"}
    base = result_payload()["provenance"]
    rows = [({"kapp_mean": 1.8}, {**base, "scanner": scanner}) for _ in range(5)]
    rows += [({"kapp_mean": 0.9}, base) for _ in range(5)]
    table = {d["scanner"]: d for d in drift(rows, ranges)}
    acme = next(c for c in table["ACME X1"]["cells"] if c["name"] == "kapp_mean")
    plain = next(c for c in table["scanner not stated"]["cells"] if c["name"] == "kapp_mean")
    assert acme["outside"] == 1.0 and acme["flag"]
    assert plain["outside"] == 0.0 and not plain["flag"]


def test_concordance_page_and_plot(service: Service) -> None:
    store = service.app.extensions["her2low_cds"].store
    prisma = {"manufacturer": "SIEMENS", "model": "Prisma"}
    acme = {"manufacturer": "ACME", "model": "Drift 3T"}
    groups = [Her2Pathology.LOW, Her2Pathology.ZERO, Her2Pathology.LOW, Her2Pathology.POSITIVE]
    for k, (adc, her2) in enumerate(zip((0.0006, 0.0019, 0.00095, 0.0014), groups, strict=True)):
        rid = _publish(service, f"MRN-C{k}", adc=adc, scanner=prisma)
        store.add_pathology(
            rid,
            her2,
            score="",
            source=PathologySource.PATHOLOGIST,
            source_key=f"k{k}",
            entered_by="dr-path",
            reported_at=datetime(2026, 11, 30, tzinfo=UTC),
        )
    for k in range(5):
        _publish(service, f"MRN-D{k}", scanner=acme, kapp_mean=2.2)
    client = ReviewClient(service, "oncologist")
    page = client.get(service.url + "/review/concordance")
    assert page.status_code == 200
    html = page.text
    assert "4 case(s) with a pathology HER2 result" in html
    assert "ACME Drift 3T" in html and "SIEMENS Prisma" in html
    acme_row = html[html.index("ACME Drift 3T") : html.index("</tr>", html.index("ACME Drift 3T"))]
    assert "drift-flag" in acme_row and "100 %" in acme_row
    prisma_row = html[
        html.index("SIEMENS Prisma") : html.index("</tr>", html.index("SIEMENS Prisma"))
    ]
    assert "drift-flag" not in prisma_row
    assert "Training reference ranges" in html
    assert "<script" not in html
    match = re.search(r'<img src="([^"]+calibration\.png)"', html)
    assert match
    plot = client.get(service.url + match.group(1))
    assert plot.status_code == 200 and plot.content.startswith(PNG_MAGIC)
    assert store.audit_events(AuditQuery(action=AuditAction.CONCORDANCE_VIEWED))
