"""The whole path on embedded defaults, as real processes over real protocols.

storescu (DCMTK) → node (C-STORE, durable write, index, stability) → Huey on SQLite → worker
(assemble, fit, ROI from SEG, features) → results API → service (ONNX model) → CDS Hooks
``patient-view`` answered over HTTP with a signed ES384 JWT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.conftest import free_port, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("e2e")]

ISSUER = "https://ehr.example.test"


class System:
    def __init__(self, home: Path, env: dict[str, str], key: ec.EllipticCurvePrivateKey) -> None:
        self.home = home
        self.env = env
        self.key = key
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def base(self) -> str:
        return self.env["HER2LOW_CDS_PUBLIC_BASE_URL"]

    @property
    def node_port(self) -> int:
        return int(self.env["HER2LOW_NODE_PORT"])

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "her2low", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen([sys.executable, "-m", "her2low", name],
                                           env=self.env, stdout=log, stderr=log))

    def token(self, audience: str, **overrides: object) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": audience, "iat": now, "exp": now + 60,
                  "jti": str(uuid.uuid4()), **overrides}
        return jwt.encode(claims, self.key, algorithm="ES384", headers={"kid": "k1", "typ": "JWT"})

    def results_token(self) -> str:
        return (self.home / "secrets" / "results-api-token").read_text().strip()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.home.glob("*.log"))


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    home = tmp_path / "home"
    home.mkdir()
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES384", use="sig")
    jwks = tmp_path / "ehr-jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    cds_port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_PORT": str(free_port()),
        "HER2LOW_NODE_HOST": "127.0.0.1",
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: str(jwks)}),
    }
    sys_ = System(home, env, key)
    key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                      serialization.NoEncryption())
    assert sys_.run("db", "upgrade").returncode == 0
    for name in ("node", "worker", "service"):
        sys_.start(name)
    _wait_http(f"{sys_.base}/cds-services")
    yield sys_
    for proc in sys_.procs:
        proc.terminate()
    for proc in sys_.procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_result(system: System, study_uid: str, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(f"{system.base}/api/v1/results", params={"study_instance_uid": study_uid},
                         headers={"Authorization": f"Bearer {system.results_token()}"}, timeout=5)
        if r.ok:
            ready = [x for x in r.json().get("results", []) if x.get("prediction")]
            if ready:
                return ready[0]
        time.sleep(1)
    raise AssertionError("no result published in time\n" + system.logs())


def test_storescu_to_card(system: System, tmp_path: Path) -> None:
    require_tool("storescu")
    study = tmp_path / "study"
    made = system.run("synth", "--out", str(study), "--seed", "11", "--lesion", "mass")
    assert made.returncode == 0, made.stderr
    manifest = json.loads((study / "manifest.json").read_text())
    sent = subprocess.run(
        ["storescu", "-aet", "PACS", "-aec", "HER2LOW", "+sd", "+r", "-xe",
         "127.0.0.1", str(system.node_port), str(study)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr
    import pydicom

    first = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    result = _wait_result(system, str(first.StudyInstanceUID))
    assert result["provenance"]["roi"]["source"] == "seg"

    patient_id = "pt-" + uuid.uuid4().hex[:8]
    prefetch = {
        "patient": {"resourceType": "Patient", "id": patient_id,
                    "identifier": [{"system": "urn:her2low:demo:mrn", "value": str(first.PatientID)}]},
        "her2": None,
        "imaging": None,
    }
    url = f"{system.base}/cds-services/her2low-mri"
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/1", "patientId": patient_id}, "prefetch": prefetch}
    answer = requests.post(url, json=body, timeout=10,
                           headers={"Authorization": f"Bearer {system.token(url)}"})
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    (suggestion,) = card["suggestions"]
    observation = suggestion["actions"][0]["resource"]
    assert observation["resourceType"] == "Observation"
    assert observation["subject"]["reference"] == f"Patient/{patient_id}"
    assert 0.0 <= observation["valueQuantity"]["value"] / (100 if observation["valueQuantity"].get("code") == "%" else 1) <= 1.0
    assert "not clinically validated" in card["detail"].lower() or "reference model" in card["detail"].lower()
    assert manifest  # the generator's manifest is there for later checks

    # the same call without a token is refused, with a JSON body
    refused = requests.post(url, json=body, timeout=10)
    assert refused.status_code == 401
    assert refused.json()["resourceType"] == "OperationOutcome"
    # broken JSON is a 400 with an OperationOutcome, not a stack trace
    broken = requests.post(url, data=b"{not json", timeout=10,
                           headers={"Content-Type": "application/json",
                                    "Authorization": f"Bearer {system.token(url)}"})
    assert broken.status_code == 400
    assert broken.json()["resourceType"] == "OperationOutcome"
