"""The node keeps the service told of its exports, and polls it for assessments.

These unit tests talk to a tiny local HTTP server speaking the results contract
(``PUT /api/v1/exports`` validated with :class:`models.contract.ExportReport`,
``GET /api/v1/assessments`` answering what the test queued), not to the real service: they
check the node's side (what is sent when, what survives an outage or a restart, what junk does
to the loop). The export queue is driven one pass at a time with a fake sender.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from dicom_node.jobs import export, results_sync
from dicom_node.jobs.export import Destination, ExportConfig, ExportPolicy, ExportState
from dicom_node.jobs.export_scu import SendOutcome, SendResult
from dicom_node.jobs.publish import PublishError
from dicom_node.jobs.results_sync import ResultsClient, SyncConfig
from models.contract import ExportReport

TOKEN = "sync-test-token"
SERIES = "1.2.826.0.1.3680043.8.498.1"
SR_UID = "1.2.826.0.1.3680043.8.498.2"


@dataclass
class FakeService:
    """The contract's two endpoints, in memory; ``down`` answers 503 to everything."""

    url: str = ""
    down: bool = False
    reports: list[ExportReport] = field(default_factory=list)
    pages: list[Any] = field(default_factory=list)
    since: list[str] = field(default_factory=list)
    raw: bytes | None = None  # an answer body that is not JSON


def _handler(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
            data = (
                raw if raw is not None else json.dumps(body).encode() if body is not None else b""
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self) -> bool:
            if service.down:
                self._answer(503, {"error": "down"})
                return True
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._answer(401, {"error": "token"})
                return True
            return False

        def do_PUT(self) -> None:
            if self._refuse():
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if urlsplit(self.path).path != "/api/v1/exports":
                self._answer(404, {})
                return
            service.reports.append(ExportReport.model_validate_json(body))
            self._answer(200, {"status": "stored"})

        def do_GET(self) -> None:
            if self._refuse():
                return
            parts = urlsplit(self.path)
            if parts.path != "/api/v1/assessments":
                self._answer(404, {})
                return
            service.since.append(parse_qs(parts.query)["since"][0])
            if service.raw is not None:
                self._answer(200, raw=service.raw)
                return
            page = service.pages.pop(0) if service.pages else None
            if page is None:
                page = {"assessments": [], "until": service.since[-1]}
            self._answer(200, page)

    return Handler


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))  # an ephemeral port
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _sessions() -> Any:
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    return session_factory(make_engine(load_settings().node_database_url))


PACS = Destination("pacs", "PACS", "127.0.0.1", 11112)


def _queue(sessions: Any, tmp_path: Path, *, dests: tuple[Destination, ...] = (PACS,)) -> int:
    """One analysed series' objects queued (two small files), its SR recorded."""
    paths = []
    for name in ("SR_a.dcm", "SEG_b.dcm"):
        path = tmp_path / name
        path.write_bytes(b"x")
        paths.append(path)
    sr = Dataset()
    sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.InstanceNumber = SR_UID, SR_UID + ".1", 1
    results_sync.record_original(
        sessions, series_uid=SERIES, pipeline_version="dki-2", sr=sr, path=paths[0]
    )
    ids = export.schedule(
        sessions,
        destinations=dests,
        paths=paths,
        batch_key=SR_UID,
        study_uid="1.2.3",
        source_series_uid=SERIES,
        calling_aet="",
    )
    return ids[0]


def _sender(outcome: SendOutcome, message: str = "") -> Any:
    def send(dest: Destination, paths: list[Path], policy: ExportPolicy) -> SendResult:
        return SendResult(outcome, message)

    return send


POLICY = ExportPolicy(calling_aet="HER2LOW", max_attempts=2, backoff_seconds=0.05)


def _send_pass(sessions: Any, sender: Any) -> list[tuple[int, ExportState]]:
    """One pass of the export thread, once the 0.05 s backoff of a failed send is over."""
    time.sleep(0.12)
    return export.run_due(sessions, [PACS], POLICY, sender=sender)


def _client(service: FakeService) -> ResultsClient:
    return ResultsClient(service.url, TOKEN, timeout=5)


def test_each_state_change_is_reported_once(
    home: Path, service: FakeService, tmp_path: Path
) -> None:
    sessions = _sessions()
    client = _client(service)
    export_id = _queue(sessions, tmp_path)
    assert results_sync.report_exports(sessions, client) == (1, 0)
    assert results_sync.report_exports(sessions, client) == (0, 0)  # nothing changed
    (scheduled,) = service.reports
    assert scheduled.series_instance_uid == SERIES and scheduled.pipeline_version == "dki-2"
    (status,) = scheduled.exports
    assert (status.destination, status.state, status.attempts, status.objects) == (
        "pacs",
        ExportState.PENDING,
        0,
        2,
    )

    refused = _sender(SendOutcome.REJECTED, "association rejected")
    assert _send_pass(sessions, refused) == [(export_id, ExportState.PENDING)]
    results_sync.report_exports(sessions, client)
    retrying = service.reports[-1].exports[0]
    assert retrying.state is ExportState.PENDING and retrying.attempts == 1
    assert retrying.last_error.startswith("rejected")

    assert _send_pass(sessions, refused) == [(export_id, ExportState.DEAD)]
    results_sync.report_exports(sessions, client)
    dead = service.reports[-1].exports[0]
    assert dead.state is ExportState.DEAD and dead.attempts == 2 and dead.sent_at is None

    assert export.retry(sessions, all_dead=True) == [export_id]  # `her2low export retry --all`
    results_sync.report_exports(sessions, client)
    assert service.reports[-1].exports[0].state is ExportState.PENDING
    assert service.reports[-1].exports[0].attempts == 0

    assert _send_pass(sessions, _sender(SendOutcome.SUCCESS)) == [(export_id, ExportState.DONE)]
    results_sync.report_exports(sessions, client)
    done = service.reports[-1].exports[0]
    assert done.state is ExportState.DONE and done.sent_at is not None and done.last_error == ""
    assert [r.exports[0].state for r in service.reports] == [
        ExportState.PENDING,
        ExportState.PENDING,
        ExportState.DEAD,
        ExportState.PENDING,
        ExportState.DONE,
    ]
    assert results_sync.report_exports(sessions, client) == (0, 0)


def test_an_outage_is_caught_up_without_blocking_the_queue(
    home: Path, service: FakeService, tmp_path: Path
) -> None:
    sessions = _sessions()
    client = _client(service)
    service.down = True
    export_id = _queue(sessions, tmp_path)
    assert results_sync.report_exports(sessions, client) == (0, 1)
    # the export queue does not wait for the service: it sends (and dead-letters) meanwhile
    refused = _sender(SendOutcome.REJECTED, "association rejected")
    _send_pass(sessions, refused)
    assert _send_pass(sessions, refused) == [(export_id, ExportState.DEAD)]
    assert results_sync.report_exports(sessions, client) == (0, 1)
    assert results_sync.unreported_series(sessions) == [SERIES]  # remembered in the database
    assert service.reports == []

    service.down = False
    fresh = _sessions()  # as a restarted worker would: nothing kept in memory
    assert results_sync.report_exports(fresh, client) == (1, 0)
    (report,) = service.reports  # only the current state, once
    assert report.exports[0].state is ExportState.DEAD
    assert results_sync.unreported_series(fresh) == []


def test_a_refused_report_is_not_resent_until_the_export_changes(
    home: Path, service: FakeService, tmp_path: Path
) -> None:
    sessions = _sessions()
    _queue(sessions, tmp_path)
    wrong_token = ResultsClient(service.url, "not-the-token", timeout=5)
    assert results_sync.report_exports(sessions, wrong_token) == (0, 0)
    assert results_sync.unreported_series(sessions) == []
    with pytest.raises(PublishError) as refused:
        wrong_token.get_assessments(results_sync.get_cursor(sessions), 10)
    assert not refused.value.transient


def _assessment_json(series: str, computed_at: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "result_id": "r-1",
        "series_instance_uid": series,
        "pipeline_version": "dki-2",
        "revision": 1,
        "descriptors": {"lesion_type": "mass"},
        "probability": 0.5,
        "model_name": "m",
        "model_version": "1",
        "computed_at": computed_at,
    }
    body.update(fields)
    return body


def test_the_poll_cursor_survives_a_restart(home: Path, service: FakeService) -> None:
    sessions = _sessions()
    config = SyncConfig(client=_client(service), export=_export_config(home), page_size=2)
    t1, t2 = "2026-12-01T10:00:00Z", "2026-12-01T10:05:00Z"
    service.pages = [  # a full page (so the next one is asked for at once), then a short one
        {
            "assessments": [
                _assessment_json("1.2.3.1", t1),
                _assessment_json("1.2.3.2", t1),
            ],
            "until": t1,
        },
        {"assessments": [_assessment_json("1.2.3.3", t2)], "until": t2},
    ]
    # series this node never analysed: nothing to revise, but the cursor moves on
    assert results_sync.poll_assessments(sessions, config) == (0, 0)
    # each poll starts a margin behind the cursor (a late commit of another service instance)
    assert service.since == ["1969-12-31T23:58:00Z", t1]
    restarted = _sessions()
    assert results_sync.get_cursor(restarted) == dt.datetime(2026, 12, 1, 10, 5, tzinfo=dt.UTC)
    results_sync.poll_assessments(restarted, config)
    assert service.since[-1] == "2026-12-01T10:03:00Z"  # t2 less the re-read margin
    # a page whose until goes backwards never moves the cursor back
    service.pages = [{"assessments": [], "until": t1}]
    results_sync.poll_assessments(restarted, config)
    assert results_sync.get_cursor(restarted).isoformat() == "2026-12-01T10:05:00+00:00"


def _export_config(home: Path) -> ExportConfig:
    return ExportConfig((PACS,), home / "outputs", POLICY)


def test_a_bad_assessment_is_skipped_and_the_good_ones_kept() -> None:
    page = results_sync.parse_page(
        {
            "assessments": [
                _assessment_json(SERIES, "2026-12-01T10:00:00Z"),
                _assessment_json("not a uid", "2026-12-01T10:00:00Z"),
                _assessment_json(SERIES, "2026-12-01T10:00:00Z", probability=7.0),
                "a string",
            ],
            "until": "2026-12-01T10:00:00Z",
        }
    )
    assert len(page.assessments) == 1 and len(page.problems) == 3
    assert all("not a uid" not in p for p in page.problems)  # errors name fields, not values
    assert results_sync.parse_page({"assessments": [], "until": "yesterday"}).until is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
FIELD_VALUES = JSON | st.sampled_from(["2026-12-01T10:00:00Z", "1.2.3", "dki-2", 1, 0.5, -1e308])
ASSESSMENT_LIKE = st.fixed_dictionaries(
    {},
    optional={
        k: FIELD_VALUES
        for k in (
            "result_id",
            "series_instance_uid",
            "pipeline_version",
            "revision",
            "descriptors",
            "probability",
            "model_name",
            "model_version",
            "not_scored",
            "computed_at",
            "statement",
            "extra",
        )
    },
)
PAGES = (
    JSON
    | st.fixed_dictionaries(
        {"assessments": st.lists(ASSESSMENT_LIKE | JSON, max_size=4), "until": FIELD_VALUES}
    )
    | st.fixed_dictionaries({"assessments": JSON, "until": FIELD_VALUES})
)


@dataclass
class JunkClient:
    """A client whose service answers ``page`` (any JSON) to every poll."""

    page: Any

    def get_assessments(self, since: dt.datetime, limit: int) -> Any:
        return self.page


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(page=PAGES)
def test_a_hostile_page_is_logged_and_skipped_never_raised(home: Path, page: Any) -> None:
    sessions = _sessions()
    before = results_sync.get_cursor(sessions)
    config = SyncConfig(client=JunkClient(page), export=_export_config(home))  # type: ignore[arg-type]
    revised, _ = results_sync.poll_assessments(sessions, config, max_pages=2)
    assert revised == 0  # no series of this node: junk never writes an SR
    after = results_sync.get_cursor(sessions)
    assert after >= before


def test_the_loop_survives_a_non_json_answer_and_keeps_reporting(
    home: Path, service: FakeService, tmp_path: Path
) -> None:
    sessions = _sessions()
    _queue(sessions, tmp_path)
    service.raw = b"<html>proxy error</html>"
    config = SyncConfig(client=_client(service), export=_export_config(home), poll_seconds=0.05)
    stop = threading.Event()
    thread = threading.Thread(
        target=results_sync.run_forever,
        args=(sessions, config, stop.is_set),
        kwargs={"tick": 0.02, "retry_base": 0.1},
        daemon=True,
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while (not service.reports or len(service.since) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread.is_alive()
        assert service.reports and service.reports[0].series_instance_uid == SERIES
        assert len(service.since) >= 2  # polled again after the junk (with its backoff)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
