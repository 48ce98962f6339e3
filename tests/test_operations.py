"""Operations: readiness, Prometheus metrics (scraped, in-process and under gunicorn), retention.

Every server binds a free port; the gunicorn service runs as a child process that each test
stops. Metric assertions compare a scrape after the action with one before, so other tests in
the same process (the registry is global) cannot make them pass by accident.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select, update
from test_cds_support import (
    PATIENT_ISSUER,
    PATIENT_SYSTEM,
    RESULTS_TOKEN,
    Service,
    hook_body,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)

from cds_service.db import MIGRATIONS as CDS_MIGRATIONS
from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.operations import apply_retention, retention_forever
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.storage import FileStore
from her2low.core.database import make_engine, session_factory
from her2low.core.ports import free_port
from her2low.core.settings import load_settings
from her2low.scu import send_files
from tests.node_data import encode, mr_dataset, write

TOKEN = {"Authorization": f"Bearer {RESULTS_TOKEN}"}
#: The scrapers' own credential (HER2LOW_METRICS_TOKEN): /metrics takes it, the results API not.
METRICS_TOKEN = "metrics-token-for-tests-9876543210"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}
DAY = 86400.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(page: Samples, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> Samples:
    response = requests.get(url + "/metrics", headers=headers or SCRAPE, timeout=timeout)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(response.text)


# --- the service ----------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path, metrics_token=METRICS_TOKEN)
    yield svc
    stop_service(svc)


def test_service_metrics_after_a_hook_call_and_a_result(service: Service) -> None:
    before = scrape(service.url)
    assert service.publish(result_payload()).status_code == 201
    answer = service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    assert answer.status_code == 200, answer.text
    discovery = service.url + "/cds-services"
    assert requests.get(discovery, headers=service.auth("/cds-services"), timeout=10).ok
    after = scrape(service.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("her2low_cds_results_received_total", status="201") == 1
    assert delta("her2low_cds_hook_seconds_count", endpoint="call", status="200") == 1
    assert delta("her2low_cds_hook_seconds_count", endpoint="discovery", status="200") == 1
    assert delta("her2low_cds_hook_seconds_bucket", endpoint="call", status="200", le="+Inf") == 1
    assert value(after, "her2low_model_loaded") == 1


def test_service_metrics_need_the_metrics_token_not_the_results_token(service: Service) -> None:
    assert requests.get(service.url + "/metrics", timeout=10).status_code == 401
    for wrong in ({"Authorization": "Bearer not-the-token"}, TOKEN):  # TOKEN publishes results
        response = requests.get(service.url + "/metrics", headers=wrong, timeout=10)
        assert response.status_code == 401
        assert response.json()["resourceType"] == "OperationOutcome"
    assert requests.get(service.url + "/metrics", headers=SCRAPE, timeout=10).status_code == 200


def test_the_metrics_token_cannot_publish_results(service: Service) -> None:
    refused = requests.post(
        service.url + "/api/v1/results", json=result_payload(), headers=SCRAPE, timeout=10
    )
    assert refused.status_code == 401, refused.text
    assert service.publish(result_payload()).status_code == 201  # the results token can


def test_metrics_token_is_generated_into_the_home_and_differs(tmp_path: Path) -> None:
    from her2low.core.settings import ConfigurationError, Settings

    settings = Settings(home=tmp_path, results_api_token="", metrics_token="")
    token = settings.metrics_scrape_token()
    assert token and token == settings.metrics_scrape_token()  # generated once, then read
    path = tmp_path / "secrets" / "metrics-token"
    assert path.read_text().strip() == token and path.stat().st_mode & 0o777 == 0o600
    assert token != settings.results_token()
    same = Settings(home=tmp_path, results_api_token="same-token", metrics_token="same-token")
    with pytest.raises(ConfigurationError, match="HER2LOW_METRICS_TOKEN"):
        same.metrics_scrape_token()


def test_service_metrics_name_the_real_model(tmp_path: Path) -> None:
    svc = start_service(tmp_path, predictor=None, metrics_token=METRICS_TOKEN)
    try:
        page = scrape(svc.url, timeout=120)  # the first scrape loads the model
    finally:
        stop_service(svc)
    infos = [dict(labels) for name, labels in page if name == "her2low_model_info"]
    assert infos, "no her2low_model_info sample"
    assert all(info["name"] and info["version"] for info in infos)
    assert {info["reference"] for info in infos} <= {"true", "false"}


def test_readyz_200_then_503_when_the_database_is_gone(service: Service) -> None:
    ok = requests.get(service.url + "/readyz", timeout=10)
    assert ok.status_code == 200
    assert ok.json()["checks"] == {"database": "ok", "model": "ok"}
    Path(str(service.settings.cds_database_url).removeprefix("sqlite:///")).unlink()
    gone = requests.get(service.url + "/readyz", timeout=10)
    assert gone.status_code == 503
    body = gone.json()
    assert body["failing"] == ["database"]
    assert body["checks"]["model"] == "ok"
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200  # alive still


def test_readyz_503_names_the_model(tmp_path: Path) -> None:
    svc = start_service(tmp_path, predictor=None, model_dir=tmp_path / "no-model-here")
    try:
        response = requests.get(svc.url + "/readyz", timeout=60)
    finally:
        stop_service(svc)
    assert response.status_code == 503
    assert response.json()["failing"] == ["model"]


@pytest.fixture
def gunicorn_service(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m cds_service --workers 2`` on a free port (the production serving path)."""
    home = tmp_path / "home"
    port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_CDS_HOST": "127.0.0.1",
        "HER2LOW_CDS_PORT": str(port),
        "HER2LOW_RESULTS_API_TOKEN": RESULTS_TOKEN,
        "HER2LOW_METRICS_TOKEN": METRICS_TOKEN,
        "HER2LOW_CDS_PATIENT_ID_SYSTEMS": json.dumps({PATIENT_ISSUER: PATIENT_SYSTEM}),
        "HER2LOW_REVIEW_PORT": "0",
        "HER2LOW_LOG_LEVEL": "WARNING",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    settings = load_settings(home=home)
    home.mkdir(parents=True, exist_ok=True)
    CDS_MIGRATIONS.upgrade(settings.cds_database_url)
    log = (tmp_path / "service.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cds_service", "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or workers still loading
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = (tmp_path / "service.log").read_text(errors="replace")
                pytest.fail(f"service did not start: {err[-2000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_gunicorn_workers_metrics_are_summed_whichever_worker_answers(
    gunicorn_service: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Results counted by a worker stay in the total after that worker is killed and replaced:
    only multiprocess mode (per-process files summed at scrape) can show them then."""
    url, master = gunicorn_service
    log = tmp_path / "service.log"

    def post(n: int) -> None:
        for _ in range(n):
            response = requests.post(
                url + "/api/v1/results",
                json=result_payload(),
                headers={**TOKEN, "Connection": "close"},
                timeout=60,
            )
            tail = log.read_text(errors="replace")[-3000:]
            assert response.status_code == 201, f"{response.text}\n{tail}"

    post(4)
    folder = next((tmp_path / "home" / "run").glob("metrics-*"))
    counting = {int(p.stem.split("_")[-1]) for p in folder.glob("counter_*.db")}
    assert counting, "multiprocess mode is off: no per-process metric files"
    for pid in counting:  # the workers that counted: our own gunicorn's children only
        if pid != master.pid and Path(f"/proc/{pid}/stat").read_text().split()[3] == str(
            master.pid
        ):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not all(not Path(f"/proc/{pid}").exists() for pid in counting if pid != master.pid):
        assert time.monotonic() < deadline, "killed workers still alive"
        time.sleep(0.1)
    post(2)  # answered by the surviving or the respawned worker
    seen = set()
    for _ in range(6):  # each scrape may land on either worker: all must show all six
        page = scrape(url, {**SCRAPE, "Connection": "close"}, timeout=30)
        seen.add(value(page, "her2low_cds_results_received_total", status="201"))
    assert seen == {6.0}


# --- the node side port -------------------------------------------------------------------------


def wait_for(side: str, seconds: float = 10) -> str:
    """The side port starts just after the DICOM port the node fixture waits for."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(side + "/healthz", timeout=2).status_code == 200:
                return side
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_node_side_port_health_readiness_and_store_counter(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    side = wait_for(node.side_url)
    assert requests.get(side + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(side + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "queue": "ok", "storage": "ok"}
    for refused in ({}, TOKEN):  # no credential, or the results API's: 401
        assert requests.get(side + "/metrics", headers=refused, timeout=5).status_code == 401
    scraper = {"Authorization": f"Bearer {node.settings.metrics_scrape_token()}"}
    before = scrape(side, scraper)
    study, series = generate_uid(), generate_uid()
    files = [write(mr_dataset(study, series, value=i), tmp_path / f"{i}.dcm") for i in range(2)]
    report = send_files(files, "127.0.0.1", node.port, called_aet=node.settings.node_ae_title)
    assert report.sent == 2
    after = scrape(side, scraper)
    received = "her2low_node_instances_received_total"
    assert value(after, received, outcome="stored") - value(before, received, outcome="stored") == 2
    assert (
        value(after, "her2low_node_series", state="receiving")
        + value(after, "her2low_node_series", state="queued")
        >= 1
    )
    assert ("her2low_node_queue_depth", frozenset()) in after
    assert ("her2low_node_exports", frozenset({("state", "dead")})) in after
    assert requests.get(side + "/nope", timeout=5).status_code == 404


def test_node_readyz_503_names_the_storage(node) -> None:  # type: ignore[no-untyped-def]
    wait_for(node.side_url)
    storage = node.settings.storage_dir
    away = storage.with_name("dicom-unmounted")
    storage.rename(away)  # the volume gone (root may write to a read-only folder, so not chmod)
    try:
        response = requests.get(node.side_url + "/readyz", timeout=5)
    finally:
        away.rename(storage)
    assert response.status_code == 503
    assert response.json()["failing"] == ["storage"]
    assert requests.get(node.side_url + "/readyz", timeout=5).status_code == 200


# --- retention ---------------------------------------------------------------------------------


def _store_series(ingestor: Ingestor, sessions: Any, n: int = 2) -> tuple[str, list[Path]]:
    """A series of ``n`` instances received through the real ingest path: (UID, file paths)."""
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        ds = mr_dataset(study, series, value=i)
        outcome = ingestor.ingest(
            encode(ds),
            sop_class_uid=MRImageStorage,
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        assert outcome.status == 0
    with sessions() as session:
        query = select(Instance.path).where(Instance.series_instance_uid == series)
        paths = [Path(p) for p in session.scalars(query)]
    assert len(paths) == n and all(p.is_file() for p in paths)
    return series, paths


def _finish(sessions: Any, series_uid: str, state: SeriesState, finished_at: float) -> None:
    """Mark a series as the runner would, its job ending at ``finished_at`` (a fake clock)."""
    with sessions() as session:
        series = session.get(Series, series_uid)
        series.state = state
        series.last_received_at = min(series.last_received_at, finished_at)
        session.add(
            Job(
                id=str(uuid.uuid4()),
                series_instance_uid=series_uid,
                generation=series.generation,
                state=JobState.FAILED if state is SeriesState.FAILED else JobState.DONE,
                created_at=finished_at,
                updated_at=finished_at,
            )
        )
        session.execute(
            update(Instance)
            .where(Instance.series_instance_uid == series_uid)
            .values(received_at=finished_at - 60)
        )
        session.commit()


def test_retention_deletes_only_files_of_series_finished_long_ago(home: Path) -> None:
    settings = load_settings()
    sessions = session_factory(make_engine(settings.node_database_url))
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)
    now = time.time() + 30 * DAY  # the fake clock: a month from now
    old_done, old_done_files = _store_series(ingestor, sessions)
    old_skipped, old_skipped_files = _store_series(ingestor, sessions, 1)
    recent_done, recent_files = _store_series(ingestor, sessions)
    old_failed, failed_files = _store_series(ingestor, sessions)
    _receiving, receiving_files = _store_series(ingestor, sessions)  # unfinished: never deleted
    _finish(sessions, old_done, SeriesState.DONE, now - 10 * DAY)
    _finish(sessions, old_skipped, SeriesState.SKIPPED, now - 8 * DAY)
    _finish(sessions, recent_done, SeriesState.DONE, now - 2 * DAY)
    _finish(sessions, old_failed, SeriesState.FAILED, now - 10 * DAY)

    assert apply_retention(sessions, settings.storage_dir, 0, now=now).files == 0  # 0 = keep
    assert all(p.exists() for p in old_done_files)

    doomed = sum(p.stat().st_size for p in old_done_files + old_skipped_files)
    report = apply_retention(sessions, settings.storage_dir, 7, now=now)
    assert (report.series, report.files, report.bytes) == (2, 3, doomed)
    assert not any(p.exists() for p in old_done_files + old_skipped_files)
    assert not old_done_files[0].parent.exists()  # the emptied series folder is gone
    assert all(p.exists() for p in recent_files + failed_files + receiving_files)
    assert settings.storage_dir.is_dir()
    with sessions() as session:  # the index (what was received) stays
        kept = session.get(Series, old_done)
        assert kept is not None and kept.state is SeriesState.DONE
        rows = session.scalars(select(Instance).where(Instance.series_instance_uid == old_done))
        assert len(rows.all()) == 2
    assert apply_retention(sessions, settings.storage_dir, 7, now=now).files == 0  # idempotent


def test_retention_spares_a_series_reopened_by_a_late_instance(home: Path) -> None:
    settings = load_settings()
    sessions = session_factory(make_engine(settings.node_database_url))
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)
    series, files = _store_series(ingestor, sessions)
    _finish(sessions, series, SeriesState.DONE, time.time() - 10 * DAY)
    with sessions() as session:
        row = session.get(Series, series)
        assert row is not None
        study = row.study_instance_uid
    late = mr_dataset(study, series, value=9)  # arrives now: re-opens the series
    outcome = ingestor.ingest(
        encode(late),
        sop_class_uid=MRImageStorage,
        sop_instance_uid=str(late.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert outcome.status == 0
    assert apply_retention(sessions, settings.storage_dir, 7).files == 0
    assert all(p.exists() for p in files)


def test_retention_runs_as_a_housekeeping_step(home: Path) -> None:
    settings = load_settings()
    sessions = session_factory(make_engine(settings.node_database_url))
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)
    series, files = _store_series(ingestor, sessions)
    _finish(sessions, series, SeriesState.DONE, time.time() - 3 * DAY)
    ticks = iter([False, True])
    retention_forever(sessions, settings.storage_dir, 1, stop=lambda: next(ticks))
    assert not any(p.exists() for p in files)


def test_worker_side_port_counts_a_skipped_job(home: Path) -> None:
    from dicom_node.jobs.pipeline import PipelineSettings
    from dicom_node.jobs.runner import run_job
    from dicom_node.jobs.scheduler import promote_stable
    from dicom_node.jobs.taskqueue import make_huey
    from dicom_node.operations import start_worker

    settings = load_settings(worker_metrics_port=free_port(), metrics_token=METRICS_TOKEN)
    sessions = session_factory(make_engine(settings.node_database_url))
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)  # creates the store
    side = start_worker(settings, sessions, make_huey(settings))
    try:
        url = wait_for(f"http://127.0.0.1:{side.port}")
        assert requests.get(url + "/readyz", timeout=5).status_code == 200
        series, _ = _store_series(ingestor, sessions, 1)
        (job_id,) = promote_stable(sessions, 0.0, now=time.time() + 60)
        before = scrape(url)
        config = PipelineSettings(
            results_url="http://127.0.0.1:9", results_token="t", quiet_seconds=1
        )
        run_job(sessions, config, job_id)  # one plain MR image: recorded, not analysed
        after = scrape(url)
    finally:
        side.close()
    with sessions() as session:
        row = session.get(Series, series)
        assert row is not None and row.state is SeriesState.SKIPPED
        key = row.reason.split(":", 1)[0]
    skipped = "her2low_node_series_skipped_total"
    reasons = {dict(labels)["reason"] for name, labels in after if name == skipped}
    assert len(reasons) >= 1 and all(" " not in r for r in reasons)
    grown = [
        r
        for r in reasons
        if value(after, skipped, reason=r) - value(before, skipped, reason=r) == 1
    ]
    assert len(grown) == 1 and grown[0].startswith(key.lower().split()[0])
    seconds = "her2low_node_job_seconds_count"
    assert value(after, seconds, outcome="skipped") - value(before, seconds, outcome="skipped") == 1
    assert ("her2low_node_queue_depth", frozenset()) not in after  # database gauges: node only


def test_worker_with_a_stalled_runner_is_not_ready(home: Path) -> None:
    """Readiness of a worker = database, queue, store and a recent runner heartbeat: its
    consumer polling the queue (or renewing a running job's lease). The polls stop (the runner
    stalled, the process alive): /readyz turns 503 naming the runner; /healthz stays 200."""
    import threading

    from dicom_node.jobs.runner import watch_queue
    from dicom_node.jobs.taskqueue import make_huey
    from dicom_node.operations import start_worker
    from her2low.core.readiness import Pulse

    settings = load_settings(
        worker_metrics_port=free_port(), metrics_token=METRICS_TOKEN, worker_lease_seconds=1.0
    )
    sessions = session_factory(make_engine(settings.node_database_url))
    Ingestor(FileStore(settings.storage_dir), sessions)  # creates the store
    huey = make_huey(settings)
    pulse = Pulse()
    watch_queue(huey, pulse)
    stalled = threading.Event()

    def consumer() -> None:  # what huey's worker threads do at rest: poll every 0.1-0.5 s
        while not stalled.is_set():
            huey.dequeue()
            time.sleep(0.1)

    polling = threading.Thread(target=consumer, daemon=True)
    polling.start()
    side = start_worker(settings, sessions, huey, pulse)
    try:
        url = wait_for(f"http://127.0.0.1:{side.port}")
        time.sleep(1.5)  # longer than the lease: only the polls keep it ready
        ready = requests.get(url + "/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["runner"] == "ok"
        stalled.set()
        polling.join(timeout=5)
        time.sleep(1.5)
        response = requests.get(url + "/readyz", timeout=5)
        assert response.status_code == 503, response.text
        assert response.json()["failing"] == ["runner"]
        assert "runner heartbeat" in response.json()["checks"]["runner"]
        assert requests.get(url + "/healthz", timeout=5).status_code == 200  # alive still
    finally:
        stalled.set()
        side.close()


def test_lease_renewals_beat_the_runner_pulse(home: Path) -> None:
    """A worker busy with a long job polls nothing: its lease renewals are its heartbeat."""
    from dicom_node.jobs.runner import Heartbeat, claim
    from dicom_node.jobs.scheduler import promote_stable
    from her2low.core.readiness import Pulse

    settings = load_settings()
    sessions = session_factory(make_engine(settings.node_database_url))
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)
    _store_series(ingestor, sessions, 1)
    (job_id,) = promote_stable(sessions, 0.0, now=time.time() + 60)
    job = claim(sessions, job_id, lease_seconds=3.0)
    assert job is not None
    pulse = Pulse()
    time.sleep(0.5)
    assert pulse.age() >= 0.5
    with Heartbeat(sessions, job, lease_seconds=3.0, every=0.2, pulse=pulse):
        time.sleep(0.7)
        assert pulse.age() < 0.5
