"""Scaled mode against real servers: PostgreSQL for both databases, Huey on Redis.

One node, two worker processes and two service instances (real processes, plain
``postgresql://`` and ``redis://`` URLs as an integrator writes them). 20 synthetic studies
arrive over 4 concurrent associations while the node is killed and restarted; each is analysed
exactly once and its card is served by either instance; a ``jti`` used at one instance is
refused by the other; a worker killed with -9 mid-job has its job finished by the other within
60 s (short leases renewed by a heartbeat); a killed service instance leaves the other
answering; nothing writes SQLite.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pynetdicom import AE
from pynetdicom.presentation import build_context

from tests.conftest import free_port
from tests.scaled_servers import Postgres, Redis, ServerUnavailable, postgres_server, redis_server
from tests.system import ISSUER, System, popen_group, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("scaled")]

STUDIES = int(os.environ.get("HER2LOW_SCALED_STUDIES", "20"))
ASSOCIATIONS = 4
PUBLIC_BASE = "https://cds.her2low.test"  # both instances sit behind one load-balanced name
HOOK_URL = f"{PUBLIC_BASE}/cds-services/her2low-mri"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Postgres, Redis]]:
    try:
        with postgres_server() as pg, redis_server() as rd:
            yield pg, rd
    except ServerUnavailable as exc:
        pytest.fail(f"{exc}; `make test` installs it")


def _sql(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """Read a database the way an operator would, with the project's own engine mapping."""
    from sqlalchemy import text

    from her2low.core.database import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query), params)]
    finally:
        engine.dispose()


# --- migrations ------------------------------------------------------------------------------


def test_migrations_run_on_postgresql_and_match_the_models(
    servers: tuple[Postgres, Redis],
) -> None:
    """Both components' migrations apply to PostgreSQL (twice: idempotent), leave each database
    at its head, and the schema they build is the one the models declare (types and lengths
    as PostgreSQL enforces them, which SQLite never checks)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    import dicom_node.jobs.export  # noqa: F401 - registers the exports table on the metadata
    from cds_service.db import MIGRATIONS as CDS_MIGRATIONS
    from cds_service.orm import Base as CdsBase
    from dicom_node.db import MIGRATIONS as NODE_MIGRATIONS
    from dicom_node.db import Base as NodeBase
    from her2low.core.database import make_engine

    pg, _ = servers
    for migrations, metadata, name in (
        (NODE_MIGRATIONS, NodeBase.metadata, "migrate_node"),
        (CDS_MIGRATIONS, CdsBase.metadata, "migrate_cds"),
    ):
        url = pg.create_database(name)
        assert url.startswith("postgresql://")  # no driver named: the project maps it
        migrations.upgrade(url)
        migrations.upgrade(url)
        migrations.check_current(url)
        engine = make_engine(url)
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        try:
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                diff = [
                    d
                    for d in compare_metadata(context, metadata)
                    if not (d[0] == "remove_table" and d[1].name.startswith("alembic_version"))
                ]
        finally:
            engine.dispose()
        assert diff == [], f"{name}: migrations differ from the models on PostgreSQL: {diff}"


def test_claim_is_exclusive_and_a_lost_message_loses_no_job(
    servers: tuple[Postgres, Redis],
) -> None:
    """On PostgreSQL, of many concurrent claims of one job exactly one wins; a queued job whose
    message the queue lost is re-sent by the scheduler; a dead worker's lease expires."""
    from dicom_node.db import MIGRATIONS, Job, JobState, Series
    from dicom_node.jobs.runner import Heartbeat, claim
    from dicom_node.jobs.scheduler import pending_jobs, stale_jobs
    from her2low.core.database import make_engine, session_factory

    pg, _ = servers
    url = pg.create_database("claims")
    MIGRATIONS.upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    try:
        now = time.time()
        with sessions() as s:
            s.add(Series(series_instance_uid="1.2.3", study_instance_uid="1.2"))
            s.flush()
            for k in range(5):
                s.add(
                    Job(
                        id=f"job-{k}",
                        series_instance_uid="1.2.3",
                        generation=1,
                        state=JobState.QUEUED,
                        created_at=now,
                        updated_at=now,
                    )
                )
            s.commit()
        for k in range(5):
            barrier = threading.Barrier(8)

            def race(job_id: str, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                return claim(sessions, job_id, lease_seconds=2.0) is not None

            with ThreadPoolExecutor(8) as pool:
                wins = list(pool.map(race, [f"job-{k}"] * 8))
            assert wins.count(True) == 1, wins

        # job-0's worker heartbeats, so its lease outlives the first 2 s; the other workers
        # died with their jobs: those leases run out and the jobs are re-queued
        with sessions() as s:
            held = s.get(Job, "job-0")
            assert held is not None
        with Heartbeat(sessions, held, lease_seconds=2.0, every=0.3):
            time.sleep(3.0)
            assert set(stale_jobs(sessions)) == {f"job-{k}" for k in range(1, 5)}
        time.sleep(2.1)  # its worker dies too: no more heartbeats
        assert stale_jobs(sessions) == ["job-0"]
        # no message reaches a worker now (a Redis restart without persistence): the queued
        # jobs are the database's, sent again at start-up and after a while without a claim
        assert set(pending_jobs(sessions)) == {f"job-{k}" for k in range(5)}
        assert len(stale_jobs(sessions, now=time.time() + 121)) == 5
    finally:
        engine.dispose()


# --- the whole system -----------------------------------------------------------------------


@dataclass
class Scaled:
    home: Path
    env: dict[str, str]
    node_url: str
    cds_url: str
    service_ports: list[int]
    key: ec.EllipticCurvePrivateKey
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.home / f"{name}.log", "ab") as log:
            proc = popen_group(
                [sys.executable, "-m", "her2low", command],
                env={**self.env, **env},
                stdout=log,
                stderr=log,
            )
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        stop_group(self.procs.pop(name), sig=sig, timeout=15)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            stop_group(proc, timeout=15)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.home.glob("*.log"))
        )

    def token(self, **claims: object) -> str:
        system = System(self.home, self.env, self.key)
        return system.token(HOOK_URL, **claims)

    def hook(self, port: int, patient_id: str, token: str | None = None) -> requests.Response:
        fhir_id = "pt-" + uuid.uuid4().hex[:8]
        body = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/1", "patientId": fhir_id},
            "prefetch": {
                "patient": {
                    "resourceType": "Patient",
                    "id": fhir_id,
                    "identifier": [{"system": "urn:her2low:demo:mrn", "value": patient_id}],
                },
                "her2": None,
                "imaging": None,
            },
        }
        return requests.post(
            f"http://127.0.0.1:{port}/cds-services/her2low-mri",
            json=body,
            timeout=15,
            headers={"Authorization": f"Bearer {token or self.token()}"},
        )


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the process exited"
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.fixture
def scaled(servers: tuple[Postgres, Redis], tmp_path: Path) -> Iterator[Scaled]:
    pg, rd = servers
    home = tmp_path / "home"
    home.mkdir()
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES384", use="sig")
    jwks = tmp_path / "ehr-jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    node_url = pg.create_database("node")
    cds_url = pg.create_database("cds")
    import redis

    redis.Redis(host="127.0.0.1", port=rd.port).flushall()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_DB_URL": node_url,
        "HER2LOW_CDS_DB_URL": cds_url,
        "HER2LOW_QUEUE_URL": rd.url(),
        "HER2LOW_RESULTS_API_TOKEN": secrets.token_urlsafe(24),
        "HER2LOW_REVIEW_SECRET_KEY": secrets.token_urlsafe(24),
        "HER2LOW_NODE_HOST": "127.0.0.1",
        "HER2LOW_NODE_PORT": str(free_port()),
        # long enough that a node restart never makes a half-sent series look stable;
        # complete series are promoted at once by their headers
        "HER2LOW_NODE_QUIET_SECONDS": "12",
        "HER2LOW_CDS_PUBLIC_BASE_URL": PUBLIC_BASE,
        "HER2LOW_CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: str(jwks)}),
        # side ports (metrics) off: five processes on one host would want their own each
        "HER2LOW_NODE_METRICS_PORT": "0",
        "HER2LOW_WORKER_METRICS_PORT": "0",
        "HER2LOW_WORKER_LEASE_SECONDS": "20",
        "HER2LOW_WORKER_HEARTBEAT_SECONDS": "4",
    }
    upgraded = subprocess.run(
        [sys.executable, "-m", "her2low", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    system = Scaled(home, env, node_url, cds_url, [free_port(), free_port()], key)
    try:
        for k, port in enumerate(system.service_ports):
            system.start(f"service-{k}", "service", HER2LOW_CDS_PORT=str(port))
        for k, port in enumerate(system.service_ports):  # worker k publishes to instance k
            system.start(
                f"worker-{k}", "worker", HER2LOW_NODE_RESULTS_URL=f"http://127.0.0.1:{port}"
            )
        system.start("node", "node")
        for k, port in enumerate(system.service_ports):
            _wait_http(f"http://127.0.0.1:{port}/cds-services", system.procs[f"service-{k}"])
        yield system
    finally:
        system.stop_all()


@dataclass
class Study:
    folder: Path
    manifest: dict[str, Any]
    patient_id: str

    @property
    def dwi_uid(self) -> str:
        return str(self.manifest["dwi"]["series_instance_uid"])

    def files(self) -> list[Path]:
        """SEG first: the diffusion series then finds its ROI already stored."""
        return [
            self.folder / f for part in ("seg", "dwi", "t2") for f in self.manifest[part]["files"]
        ]


def _make_study(out: Path, seed: int, **options: Any) -> Study:
    from dicom_node.synth import write_study

    write_study(out, seed=seed, **options)
    manifest = json.loads((out / "manifest.json").read_text())
    first = pydicom.dcmread(out / manifest["dwi"]["files"][0], stop_before_pixels=True)
    return Study(out, manifest, str(first.PatientID))


class Sender:
    """C-STOREs files over real associations, recording every instance acknowledged with
    success; what a dead association did not acknowledge is sent again, as a router does."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acknowledged: set[str] = set()
        self.lock = threading.Lock()

    def send(self, files: list[Path], calling_aet: str, deadline: float) -> None:
        datasets = [pydicom.dcmread(f) for f in files]
        left = list(datasets)
        while left:
            assert time.monotonic() < deadline, f"{calling_aet}: {len(left)} never acknowledged"
            ae = AE(ae_title=calling_aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
            classes = sorted({str(ds.SOPClassUID) for ds in left})
            ae.requested_contexts = [build_context(c, "1.2.840.10008.1.2.1") for c in classes]
            try:
                assoc = ae.associate("127.0.0.1", self.port, ae_title="HER2LOW")
            except Exception:
                time.sleep(0.5)
                continue
            if not assoc.is_established:
                time.sleep(0.5)
                continue
            done: list[pydicom.Dataset] = []
            try:
                for ds in left:
                    status = assoc.send_c_store(ds)
                    if getattr(status, "Status", None) != 0x0000:
                        break
                    done.append(ds)
                    with self.lock:
                        self.acknowledged.add(str(ds.SOPInstanceUID))
            except Exception:
                pass
            finally:
                if assoc.is_established:
                    assoc.release()
            left = [ds for ds in left if all(ds is not d for d in done)]
            if left:
                time.sleep(0.5)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)


def _claimed_by(system: Scaled, job_id: str) -> str | None:
    """Which worker logged the latest claim of ``job_id`` (``worker-0`` / ``worker-1``)."""
    latest: tuple[int, str] | None = None
    for name in ("worker-0", "worker-1"):
        path = system.home / f"{name}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if job_id in line and '"job claimed"' in line:
                attempt = int(json.loads(line).get("attempt", 0))
                if latest is None or attempt >= latest[0]:
                    latest = (attempt, name)
    return latest[1] if latest else None


def _wait(predicate: Any, timeout: float, what: str, system: Scaled) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:.0f} s\n{system.logs()}")


@pytest.mark.timeout(900)  # ≈ 6 min on a loaded 2-core machine; the default is 600 s
def test_scaled_mode_end_to_end(scaled: Scaled, tmp_path: Path) -> None:
    system = scaled
    began = time.monotonic()

    def phase(name: str) -> None:  # shown with the output of a failing run (and with -s)
        print(f"[scaled] {time.monotonic() - began:6.1f} s  {name}", flush=True)

    studies_dir = tmp_path / "studies"
    small = {"matrix": (32, 64), "slices": 4}
    with ThreadPoolExecutor(2) as pool:
        studies = list(
            pool.map(
                lambda k: _make_study(studies_dir / f"s{k:02d}", 300 + k, **small), range(STUDIES)
            )
        )

    phase("studies written")
    # 20 studies over 4 concurrent associations; the node is killed (-9) and restarted
    # once a third of the instances are in, and the senders re-send what it did not confirm
    sender = Sender(int(system.env["HER2LOW_NODE_PORT"]))
    total = sum(len(s.files()) for s in studies)
    deadline = time.monotonic() + 600
    shards = [studies[k::ASSOCIATIONS] for k in range(ASSOCIATIONS)]

    def send_shard(k: int) -> None:
        for study in shards[k]:
            sender.send(study.files(), f"MOD{k}", deadline)

    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        futures = [pool.submit(send_shard, k) for k in range(ASSOCIATIONS)]
        _wait(lambda: sender.count >= total // 3, 300, "a third of the instances", system)
        system.kill("node")  # SIGKILL: no goodbye, mid-association
        at_kill = set(sender.acknowledged)
        system.start("node", "node")
        for future in futures:
            future.result()
    assert len(sender.acknowledged) == total
    assert len(at_kill) < total  # the restart really was mid-stream

    phase("all instances acknowledged")
    # nothing that got a success status was lost: every acknowledged instance is indexed
    stored = {uid for (uid,) in _sql(system.node_url, "SELECT sop_instance_uid FROM instances")}
    assert sender.acknowledged <= stored, f"{len(sender.acknowledged - stored)} lost"

    # each study analysed exactly once: one job per diffusion series, done with a result, one
    # result and one revision in the service database
    dwi = [s.dwi_uid for s in studies]

    def all_done() -> bool:
        rows = _sql(
            system.node_url,
            "SELECT count(*) FROM series WHERE series_instance_uid = ANY(:uids) AND state = 'DONE'",
            uids=dwi,
        )
        return rows[0][0] == len(dwi)

    _wait(all_done, 420, "every diffusion series analysed", system)
    phase("every diffusion series analysed")
    jobs = _sql(
        system.node_url,
        "SELECT series_instance_uid, state, result_id, attempts FROM jobs "
        "WHERE series_instance_uid = ANY(:uids)",
        uids=dwi,
    )
    # A job still queued when its series is re-opened (an instance the restart delayed) is
    # superseded before any worker runs it: only the jobs that ran count as analyses.
    ran = [r for r in jobs if r[1] != "SUPERSEDED"]
    assert sorted(r[0] for r in ran) == sorted(dwi), f"a diffusion series analysed twice: {jobs}"
    assert all(r[1] == "DONE" and r[2] for r in ran), jobs
    results = _sql(
        system.cds_url,
        "SELECT r.series_instance_uid, count(v.id) FROM results r "
        "JOIN result_revisions v ON v.result_id = r.id GROUP BY r.series_instance_uid",
    )
    assert sorted(r[0] for r in results) == sorted(dwi)
    assert all(count == 1 for _, count in results), results
    # both workers took jobs (the queue spreads them; the claim keeps them single)
    workers_seen = {
        name
        for name in ("worker-0", "worker-1")
        if '"job claimed"' in (system.home / f"{name}.log").read_text(errors="replace")
    }
    assert workers_seen == {"worker-0", "worker-1"}

    # every card is served by either instance
    for k, study in enumerate(studies):
        port = system.service_ports[k % 2]
        answer = system.hook(port, study.patient_id)
        assert answer.status_code == 200, answer.text
        (card,) = answer.json()["cards"]
        assert "not clinically validated" in card["detail"].lower()

    phase("cards served by both instances")
    # a jti used at one instance is refused by the other (one replay table in PostgreSQL)
    once = system.token()
    first = system.hook(system.service_ports[0], studies[0].patient_id, once)
    assert first.status_code == 200, first.text
    replay = system.hook(system.service_ports[1], studies[0].patient_id, once)
    assert replay.status_code == 401, replay.text

    # a worker killed with -9 mid-job: the other finishes the job within 60 s
    big = _make_study(tmp_path / "big", 999)  # full-size: its fit lasts long enough to kill
    sender.send([big.folder / f for f in big.manifest["seg"]["files"]], "MOD0", deadline)

    def seg_settled() -> bool:
        rows = _sql(
            system.node_url,
            "SELECT state FROM series WHERE series_instance_uid = :uid",
            uid=big.manifest["seg"]["series_instance_uid"],
        )
        return bool(rows) and rows[0][0] in ("DONE", "SKIPPED")

    _wait(seg_settled, 60, "the segmentation processed", system)
    sender.send([big.folder / f for f in big.manifest["dwi"]["files"]], "MOD0", deadline)

    def running_job() -> tuple[str, str] | None:
        rows = _sql(
            system.node_url,
            "SELECT id FROM jobs WHERE series_instance_uid = :uid AND state = 'RUNNING'",
            uid=big.dwi_uid,
        )
        if not rows:
            return None
        owner = _claimed_by(system, rows[0][0])
        return (rows[0][0], owner) if owner else None

    phase("big study sent")
    job_id, owner = _wait(running_job, 120, "the big job claimed", system)
    system.kill(owner)
    killed_at = time.monotonic()
    phase(f"{owner} killed (-9) mid-job")
    (state, attempts), *_ = _sql(
        system.node_url, "SELECT state, attempts FROM jobs WHERE id = :id", id=job_id
    )
    assert state == "RUNNING", f"the job ended before the kill ({state}): kill came too late"

    def finished() -> bool:
        rows = _sql(system.node_url, "SELECT state, result_id FROM jobs WHERE id = :id", id=job_id)
        return rows[0][0] == "DONE" and bool(rows[0][1])

    _wait(finished, 60, "the killed worker's job finished by the other", system)
    assert time.monotonic() - killed_at < 60
    survivor = ({"worker-0", "worker-1"} - {owner}).pop()
    assert _claimed_by(system, job_id) == survivor
    ((attempts_after,),) = _sql(
        system.node_url, "SELECT attempts FROM jobs WHERE id = :id", id=job_id
    )
    assert attempts_after == attempts + 1

    phase("killed job finished by the other worker")
    # a service instance killed: the other still answers
    system.kill("service-1")
    answer = system.hook(system.service_ports[0], big.patient_id)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["cards"]) == 1

    # nothing wrote SQLite: no database file anywhere under the home
    assert [p for p in system.home.rglob("*") if _is_sqlite(p)] == []


def _is_sqlite(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(16) == b"SQLite format 3\0"
