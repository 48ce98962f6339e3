"""The whole path on embedded defaults, as real processes over real protocols.

storescu (DCMTK) → node (C-STORE, durable write, index, stability) → Huey on SQLite → worker
(assemble, fit, ROI from SEG, features) → results API → service (ONNX model) → CDS Hooks
``patient-view`` answered over HTTP with a signed ES384 JWT.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

from tests.conftest import require_tool
from tests.system import System, running_system

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("e2e")]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with running_system(tmp_path) as running:
        yield running


def test_storescu_to_card(system: System, tmp_path: Path) -> None:
    require_tool("storescu")
    study = tmp_path / "study"
    made = system.run("synth", "--out", str(study), "--seed", "11", "--lesion", "mass")
    assert made.returncode == 0, made.stderr
    manifest = json.loads((study / "manifest.json").read_text())
    sent = subprocess.run(
        [
            "storescu",
            "-aet",
            "PACS",
            "-aec",
            "HER2LOW",
            "+sd",
            "+r",
            "-xe",
            "-R",  # propose exactly the SOP classes of the files (SEG is not in the default list)
            "127.0.0.1",
            str(system.node_port),
            *(str(study / part) for part in ("dwi", "t2", "seg")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr
    import pydicom

    first = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    result = system.wait_result(str(first.StudyInstanceUID))
    assert result["provenance"]["roi"]["source"] == "seg"

    patient_id = "pt-" + uuid.uuid4().hex[:8]
    prefetch = {
        "patient": {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [{"system": "urn:her2low:demo:mrn", "value": str(first.PatientID)}],
        },
        "her2": None,
        "imaging": None,
    }
    url = f"{system.base}/cds-services/her2low-mri"
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": patient_id},
        "prefetch": prefetch,
    }
    answer = requests.post(
        url, json=body, timeout=10, headers={"Authorization": f"Bearer {system.token(url)}"}
    )
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    (suggestion,) = card["suggestions"]
    observation = suggestion["actions"][0]["resource"]
    assert observation["resourceType"] == "Observation"
    assert observation["subject"]["reference"] == f"Patient/{patient_id}"
    quantity = observation["valueQuantity"]
    probability = quantity["value"] / (100 if quantity.get("code") == "%" else 1)
    assert 0.0 <= probability <= 1.0
    assert "not clinically validated" in card["detail"].lower()
    # the result came from the tumour of the generated study, on the side the generator chose
    assert result["laterality"] == manifest["laterality"]
    # the case page a tumour board opens from the card shows the maps the node published
    browser = system.review_session()
    page = browser.get(card["links"][0]["url"], timeout=10)
    assert page.status_code == 200
    images = re.findall(r'<img[^>]* src="([^"]+)"', page.text)
    assert images, "the case page shows no maps"
    first = browser.get(urljoin(page.url, images[0]), timeout=10)
    assert first.status_code == 200 and first.content.startswith(b"\x89PNG")

    # the same call without a token is refused, with a JSON body
    refused = requests.post(url, json=body, timeout=10)
    assert refused.status_code == 401
    assert refused.json()["resourceType"] == "OperationOutcome"
    # broken JSON is a 400 with an OperationOutcome, not a stack trace
    broken = requests.post(
        url,
        data=b"{not json",
        timeout=10,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {system.token(url)}",
        },
    )
    assert broken.status_code == 400
    assert broken.json()["resourceType"] == "OperationOutcome"
