"""The compose stack run for real, the way an offline hospital runs it (deploy/compose.yaml).

No registry: the infrastructure (PostgreSQL, Redis, Orthanc, nginx) comes from one image made
of Debian's packages by ``deploy/compose/offline/build-infra.sh`` and named by the override
``deploy/compose.offline.yaml``; the her2low image is the one tests/test_container.py uses
(built once per run, tests/container_support.py). ``podman-compose`` (Debian's) runs the
stack with ``CONTAINERS_CONF=deploy/compose/offline/containers.conf`` (runc, explicit ulimits)
on podman's bridge network (service names resolve through the CNI dnsname plugin) with every
host port a free one passed as a variable — the commands docs/deploy.md gives.

The demo study goes to Orthanc with DCMTK's storescu; Orthanc routes it (OnStableSeries) to
the node; one of the two workers analyses it with PostgreSQL and Redis; the card comes back
through nginx over TLS (a test CA) for a hook call signed with an ES384 key whose JWKS the
service fetches from this test. Then ``down``: no container, pod, volume, network or process
of the project may survive.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import jwt
import pydicom
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from her2low.core.settings import load_settings
from tests.conftest import free_port, require_tool
from tests.container_support import ROOT, build_cache, built_image, podman
from tests.server_pki import server_pki

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("container")]

DEPLOY = ROOT / "deploy"
COMPOSE_FILES = ["-f", str(DEPLOY / "compose.yaml"), "-f", str(DEPLOY / "compose.offline.yaml")]
CONTAINERS_CONF = DEPLOY / "compose" / "offline" / "containers.conf"
BUILD_INFRA = DEPLOY / "compose" / "offline" / "build-infra.sh"
ISSUER = "https://ehr.compose.test"
SERVICE_ID = "her2low-mri"
RESULTS_TOKEN = "compose-results-token-0123456789"
METRICS_TOKEN = "compose-metrics-token-9876543210"


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    """(her2low image, infrastructure image), each built once and reused while unchanged."""
    image = built_image()  # skips with the reason where podman cannot run at all
    require_tool("podman-compose")
    env = {**os.environ, "HER2LOW_BUILD_CACHE": str(build_cache())}
    built = subprocess.run(
        ["bash", str(BUILD_INFRA)], capture_output=True, text=True, timeout=1200, env=env
    )
    assert built.returncode == 0, built.stderr[-5000:]
    infra = built.stdout.strip().splitlines()[-1]
    # podman with the compose stack's containers.conf (runc, ulimits) must run a container
    probe = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", infra, "true"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
    )
    if probe.returncode != 0 and "OCI runtime" in probe.stderr:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()}")
    assert probe.returncode == 0, probe.stderr
    return image, infra


# --- the site's certificate (a test CA) and the EHR's signing key -------------------------------


def make_tls(folder: Path) -> Path:
    """A test CA and a server certificate for 127.0.0.1 in ``folder`` (cds.crt, cds.key, the
    names deploy/nginx/her2low.conf reads); returns the CA certificate to verify against."""
    pki = server_pki("her2low compose test CA")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cds.crt").write_bytes(pki.cert)
    (folder / "cds.key").write_bytes(pki.key)
    for path in folder.iterdir():
        path.chmod(0o644)  # read by nginx's user inside the container
    folder.chmod(0o755)
    ca_path = folder.parent / "ca.crt"
    ca_path.write_bytes(pki.ca)
    return ca_path


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """The service's JWKS fetches are expected; nothing to log."""


@dataclass
class Ehr:
    """The EHR: an ES384 key, its JWKS served over HTTP to the containers, signed hook JWTs."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP384R1())
    )
    kid: str = "compose-ehr-1"
    fetches: int = 0
    server: WSGIServer | None = None

    def start(self) -> Ehr:
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "alg": "ES384", "use": "sig"})
        body = json.dumps({"keys": [jwk]}).encode()

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            self.fetches += 1
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]

        # every address: the containers reach it as host.containers.internal (their gateway)
        self.server = make_server("0.0.0.0", free_port(), app, handler_class=_Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def jwks_url(self) -> str:
        assert self.server is not None
        return f"http://host.containers.internal:{self.server.server_port}/jwks.json"

    def token(self, audience: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": audience,
            "iat": now,
            "exp": now + 120,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, self.key, algorithm="ES384", headers={"kid": self.kid, "typ": "JWT"}
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# --- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    https: str
    orthanc_dicom_port: int
    ca: Path
    ehr: Ehr

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman-compose", "-p", self.project, *COMPOSE_FILES, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )

    def containers(self) -> list[str]:
        listed = podman(
            "ps", "-a", "--format", "{{.ID}} {{.Names}}", "--filter", f"label={self.label}"
        )
        return [line for line in listed.stdout.splitlines() if line.strip()]

    @property
    def label(self) -> str:
        return f"io.podman.compose.project={self.project}"

    def logs(self) -> str:
        parts = []
        for line in self.containers():
            name = line.split()[1]
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            tail = podman("logs", "--tail", "25", name)
            parts.append(f"--- {name} ({state})\n{tail.stdout[-3000:]}{tail.stderr[-2000:]}")
        return "\n".join(parts)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.https + path, verify=str(self.ca), timeout=15, **kwargs)


def _survivors(stack: Stack, ids: list[str]) -> list[str]:
    """Anything of the project left after ``down``: containers, pods, volumes, the network,
    and processes (conmon and the containers' own, whose command lines name the container)."""
    left = [f"container {line}" for line in stack.containers()]
    pods = podman("pod", "ps", "--format", "{{.Name}}", "--filter", f"label={stack.label}")
    left += [f"pod {name}" for name in pods.stdout.split()]
    volumes = podman("volume", "ls", "--format", "{{.Name}}", "--filter", f"label={stack.label}")
    left += [f"volume {name}" for name in volumes.stdout.split()]
    if podman("network", "exists", f"{stack.project}_default").returncode == 0:
        left.append(f"network {stack.project}_default")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(cid and cid in cmdline for cid in ids) or stack.project in cmdline:
            left.append(f"process {proc.name}: {cmdline[:200]}")
    return left


def down(stack: Stack) -> subprocess.CompletedProcess[str]:
    """What docs/deploy.md says to stop the stack with: ``down -v``, then the network
    (podman-compose 1.0 leaves the network it made)."""
    done = stack.compose("down", "-v", timeout=300)
    podman("network", "rm", "-f", f"{stack.project}_default", timeout=60)
    return done


@pytest.fixture
def stack(images: tuple[str, str], tmp_path: Path) -> Iterator[Stack]:
    """The whole stack up (free host ports, a test CA, a short Orthanc StableAge), then down."""
    image, infra = images
    ca = make_tls(tmp_path / "tls")
    orthanc = json.loads((DEPLOY / "compose" / "orthanc.json").read_text())
    orthanc["StableAge"] = 2  # the shipped 60 s, shortened: the routing is the same
    orthanc_config = tmp_path / "orthanc.json"
    orthanc_config.write_text(json.dumps(orthanc))
    orthanc_config.chmod(0o644)
    https_port = free_port()
    public = f"https://127.0.0.1:{https_port}"
    ehr = Ehr().start()
    project = f"her2low-test-{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HER2LOW_")},
        "CONTAINERS_CONF": str(CONTAINERS_CONF),
        "HER2LOW_IMAGE": image,
        "HER2LOW_INFRA_IMAGE": infra,
        "HER2LOW_DB_PASSWORD": uuid.uuid4().hex,
        "HER2LOW_RESULTS_API_TOKEN": RESULTS_TOKEN,
        "HER2LOW_METRICS_TOKEN": METRICS_TOKEN,
        "HER2LOW_REVIEW_SECRET_KEY": uuid.uuid4().hex,
        "HER2LOW_CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: ehr.jwks_url}),
        "HER2LOW_CDS_PUBLIC_BASE_URL": public,
        "HER2LOW_HTTPS_PORT": str(https_port),
        "HER2LOW_HTTP_PORT": str(free_port()),
        "HER2LOW_DICOM_PORT": str(free_port()),
        "HER2LOW_ORTHANC_DICOM_PORT": str(free_port()),
        "HER2LOW_ORTHANC_HTTP_PORT": str(free_port()),
        "HER2LOW_TLS_DIR": str(tmp_path / "tls"),
        "HER2LOW_ORTHANC_CONFIG": str(orthanc_config),
        "HER2LOW_NODE_QUIET_SECONDS": "2",
    }
    running = Stack(
        project=project,
        env=env,
        https=public,
        orthanc_dicom_port=int(env["HER2LOW_ORTHANC_DICOM_PORT"]),
        ca=ca,
        ehr=ehr,
    )
    ids: list[str] = []
    try:
        up = running.compose("up", "-d")
        ids = [line.split()[0] for line in running.containers()]
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield running
    finally:
        ids = ids or [line.split()[0] for line in running.containers()]
        stopped = down(running)
        ehr.stop()
        left = _survivors(running, ids)
        assert not left, f"left after down: {left}\n{stopped.stdout[-2000:]}"
        assert stopped.returncode == 0, stopped.stderr[-3000:]


def wait_until(what: str, stack: Stack, seconds: float, probe: Any) -> Any:
    """``probe()`` until it returns something truthy; fail with the containers' logs."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except requests.RequestException as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"{what} not within {seconds:.0f} s (last: {last!r})\n{stack.logs()}")


def demo_study(folder: Path) -> list[Path]:
    """The synthetic demo study ``her2low demo`` sends (same generator and parameters)."""
    from dicom_node.synth import write_study

    write_study(folder, seed=7, lesion="mass", snr=30.0, vendor="siemens")
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


@pytest.mark.timeout(1800)
def test_compose_stack_routes_the_demo_study_from_orthanc_to_a_card_through_nginx(
    stack: Stack, tmp_path: Path
) -> None:
    files = demo_study(tmp_path / "study")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)

    def ready() -> bool:
        return stack.get("/readyz").status_code == 200

    wait_until("the service ready through nginx (TLS)", stack, 240, ready)

    # the EHR's PACS: the study goes to Orthanc, which routes it to the node on its own
    sent = subprocess.run(
        [
            "/usr/bin/storescu" if os.path.exists("/usr/bin/storescu") else "storescu",
            "-aet", "MODALITY", "-aec", "ORTHANC", "-R", "+sd", "+r", "+sp", "*.dcm",
            "127.0.0.1", str(stack.orthanc_dicom_port), str(tmp_path / "study"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr[-3000:] + stack.logs()

    results = {"Authorization": f"Bearer {RESULTS_TOKEN}"}

    def analysed() -> dict[str, Any] | None:
        answer = stack.get(
            "/api/v1/results", params={"study_instance_uid": study_uid}, headers=results
        )
        if not answer.ok:
            return None
        body = answer.json()
        rows = body.get("results", body) if isinstance(body, dict) else body
        done = [r for r in rows if r.get("prediction")]
        return done[0] if done else None

    result = wait_until("the study analysed and published", stack, 300, analysed)
    assert result["study_instance_uid"] == study_uid

    # the hook call, as the EHR makes it: signed ES384 JWT whose JWKS the service fetches here
    patient = _patient(first)
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "context": {"userId": "Practitioner/compose-oncologist", "patientId": patient["id"]},
        "prefetch": {"patient": patient, "her2": None, "imaging": None},
    }
    endpoint = f"{stack.https}/cds-services/{SERVICE_ID}"
    answer = requests.post(
        endpoint,
        json=body,
        headers={"Authorization": f"Bearer {stack.ehr.token(endpoint)}"},
        verify=str(stack.ca),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text + stack.logs()
    cards = answer.json()["cards"]
    assert cards and "HER2-low" in cards[0]["summary"], cards
    assert stack.ehr.fetches >= 1  # the signature was checked against the EHR's own JWKS
    unsigned = requests.post(endpoint, json=body, verify=str(stack.ca), timeout=30)
    assert unsigned.status_code == 401

    # metrics: the scrapers' token only, never the results API's
    assert stack.get("/metrics", headers=results).status_code == 401
    scraped = stack.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and "her2low_cds_hook_seconds" in scraped.text

    # each worker's HEALTHCHECK: its side port's readiness (database, queue, runner heartbeat)
    for worker in ("worker-1", "worker-2"):
        name = f"{stack.project}_{worker}_1"
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, health.stdout + health.stderr + stack.logs()


def _patient(first: pydicom.Dataset) -> dict[str, Any]:
    """The FHIR Patient the EHR holds for the DICOM patient (the service's default issuer
    mapping: the compose file configures no HER2LOW_CDS_PATIENT_ID_SYSTEMS)."""
    from her2low.demo import patient_resource

    return patient_resource(first, load_settings())
