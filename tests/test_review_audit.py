"""The admin audit page (issue 13): filters, CSV export (audited), and one vocabulary of
actions (``AuditAction``) for everything the service writes."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
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
from cds_service.orm import AuditEvent
from cds_service.schema import FeedbackOutcome
from cds_service.store import AuditQuery, BoardDecision, IngestStatus, ReviewFlag
from cds_service.writeback import WritebackOutcome


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


def test_every_coded_outcome_has_an_audit_action() -> None:
    for status in IngestStatus:
        assert AuditAction.result(status.value)
    for decision in BoardDecision:
        assert AuditAction.board(decision.value)
    for outcome in FeedbackOutcome:
        assert AuditAction.feedback(outcome.value)
    for flag in ReviewFlag:
        assert AuditAction(flag.value)
    for written in WritebackOutcome:
        assert AuditAction(written.value)


def _events(service: Service) -> list[AuditEvent]:
    with service.app.extensions["her2low_cds"].store.sessions() as s:
        return list(s.query(AuditEvent))


def test_every_stored_action_is_in_the_vocabulary(service: Service) -> None:
    answer = service.publish(result_payload())
    rid = answer.json()["result_id"]
    service.publish(result_payload(series=None))
    hook = service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    assert hook.status_code == 200
    radiologist = ReviewClient(service, "radiologist")
    radiologist.get(f"{service.url}/review/cases/{rid}")
    radiologist.post(
        f"{service.url}/review/cases/{rid}/decision", {"decision": "confirm", "reason": "other"}
    )
    admin = ReviewClient(service, "admin")
    admin.get(service.url + "/review/admin/audit")
    actions = {e.action for e in _events(service)}
    assert {"result-created", "card-shown", "signed-in", "case-viewed", "audit-viewed"} <= actions
    for action in actions:
        AuditAction(action)  # raises on a bare string outside the vocabulary


def _table(html: str) -> str:
    return html[html.index("<tbody>") :]


def test_filters_and_csv(service: Service) -> None:
    store = service.app.extensions["her2low_cds"].store
    rid = service.publish(result_payload()).json()["result_id"]
    store.audit("=cmd|' /C calc'!A0", AuditAction.CASE_VIEWED, rid, {"note": "+1"})
    store.audit("dr-other", AuditAction.CASE_VIEWED, None)
    admin = ReviewClient(service, "admin")
    base = service.url + "/review/admin/audit"
    page = admin.get(base, params={"action": "case-viewed", "case": rid})
    assert page.status_code == 200
    table = _table(page.text)
    assert "=cmd" in table and "dr-other" not in table
    by_actor = _table(admin.get(base, params={"actor": "dr-other"}).text)
    assert "dr-other" in by_actor and "result-created" not in by_actor
    today = datetime.now(UTC).date()
    empty = admin.get(base, params={"until": str(today - timedelta(days=1))}).text
    assert "0 event(s)" in empty
    assert admin.get(base, params={"since": "yesterday"}).status_code == 400
    assert admin.get(base, params={"action": "made-up"}).status_code == 400
    export = admin.get(
        service.url + "/review/admin/audit.csv",
        params={"action": "case-viewed", "since": str(today), "until": str(today)},
    )
    assert export.status_code == 200
    assert export.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in export.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(export.text)))
    assert rows[0] == ["id", "at_utc", "actor", "action", "case", "detail"]
    actors = [r[2] for r in rows[1:]]
    assert set(r[3] for r in rows[1:]) == {"case-viewed"}
    assert "'=cmd|' /C calc'!A0" in actors and "dr-other" in actors  # no formula runs
    (exported,) = store.audit_events(AuditQuery(action=AuditAction.AUDIT_EXPORTED))
    assert exported.actor == "dr-admin"
    assert exported.detail == {
        "filters": {"action": "case-viewed", "since": str(today), "until": str(today)},
        "rows": len(rows) - 1,
    }


def test_only_admins(service: Service) -> None:
    oncologist = ReviewClient(service, "oncologist")
    for path in ("/review/admin/audit", "/review/admin/audit.csv"):
        assert oncologist.get(service.url + path).status_code == 403
        anon = requests.get(service.url + path, timeout=10, allow_redirects=False)
        assert anon.status_code in (302, 303)
