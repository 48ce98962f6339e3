"""``her2low demo``: the synthetic study through a running system, as an EHR integrator sees it.

Writes (once) the synthetic study, sends it to the node over a real DICOM association, waits for
the published result, then calls the CDS service exactly as an EHR would: a ``patient-view``
request with prefetch and a signed JWT. Prints the card (and, with ``--json``, everything an
integrator needs to repeat the call).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom
import requests

from her2low import demo_ehr
from her2low.core.settings import Settings
from her2low.scu import send_files

SERVICE_ID = "her2low-mri"


def _local(url_host: str) -> str:
    return "127.0.0.1" if url_host in ("0.0.0.0", "") else url_host


def demo_study(settings: Settings, seed: int) -> Path:
    """The demo study's folder, written by the synthetic generator on first use."""
    out = settings.home / "demo" / f"study-seed{seed}"
    if not (out / "manifest.json").exists():
        from dicom_node.synth import write_study

        write_study(out, seed=seed, lesion="mass", snr=30.0, vendor="siemens")
    return out


def study_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def patient_resource(first: pydicom.Dataset, settings: Settings) -> dict[str, Any]:
    """The FHIR Patient an EHR would hold for the DICOM patient (identifier via issuer table)."""
    issuer = str(first.get("IssuerOfPatientID", "") or "")
    system = settings.cds_patient_id_systems.get(
        issuer, f"urn:her2low:issuer:{issuer or 'unknown'}"
    )
    value = str(first.PatientID)
    return {
        "resourceType": "Patient",
        "id": f"demo-{value}".replace("_", "-")[:64],
        "identifier": [{"system": system, "value": value}],
        "active": True,
    }


def wait_for_result(settings: Settings, study_uid: str, timeout: float) -> dict[str, Any]:
    url = settings.node_results_url.rstrip("/") + "/api/v1/results"
    headers = {"Authorization": f"Bearer {settings.results_token()}"}
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            response = requests.get(
                url, params={"study_instance_uid": study_uid}, headers=headers, timeout=5
            )
            if response.ok:
                body = response.json()
                results = body.get("results", body) if isinstance(body, dict) else body
                ready = [r for r in results if r.get("prediction")]
                if ready:
                    return dict(ready[0])
            else:
                last_error = f"results API answered {response.status_code}"
        except requests.RequestException as exc:
            last_error = type(exc).__name__
        time.sleep(1.0)
    raise TimeoutError(f"no result for the demo study within {timeout:.0f} s ({last_error})")


def call_hook(
    settings: Settings, patient: dict[str, Any], prefetch: dict[str, Any]
) -> dict[str, Any]:
    base = settings.cds_public_base_url.rstrip("/")
    endpoint = f"{base}/cds-services/{SERVICE_ID}"
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "context": {"userId": "Practitioner/demo-oncologist", "patientId": patient["id"]},
        "prefetch": prefetch,
    }
    headers = {"Content-Type": "application/json"}
    if settings.cds_auth_required:
        # Signed as the local demo EHR; a site that configured its own issuers will (rightly)
        # refuse this token unless it also trusts the demo issuer.
        demo_ehr.ensure_keys(settings.home)
        headers["Authorization"] = "Bearer " + demo_ehr.token(settings.home, endpoint)
    local = f"http://{_local(settings.cds_host)}:{settings.cds_port}/cds-services/{SERVICE_ID}"
    response = requests.post(local, json=body, headers=headers, timeout=10)
    response.raise_for_status()
    return dict(response.json())


def demo(
    settings: Settings, *, as_json: bool = False, timeout: float = 120.0, seed: int = 7
) -> int:
    folder = demo_study(settings, seed)
    files = study_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    try:
        report = send_files(
            files, _local(settings.node_host), settings.node_port, called_aet=settings.node_ae_title
        )
    except (ConnectionError, OSError) as exc:
        print(
            f"her2low demo: the DICOM node did not accept the association ({exc}); is it running, "
            "and does HER2LOW_NODE_ALLOWED_CALLING_AETS allow HER2LOW-DEMO?",
            file=sys.stderr,
        )
        return 1
    if report.failed:
        print(
            f"her2low demo: {len(report.failed)} instances refused: {report.failed}",
            file=sys.stderr,
        )
        return 1
    study_uid = str(first.StudyInstanceUID)
    try:
        result = wait_for_result(settings, study_uid, timeout)
    except TimeoutError as exc:
        print(f"her2low demo: {exc}", file=sys.stderr)
        return 1
    patient = patient_resource(first, settings)
    prefetch: dict[str, Any] = {"patient": patient, "her2": None, "imaging": None}
    answer = call_hook(settings, patient, prefetch)
    cards = answer.get("cards", [])
    base = settings.cds_public_base_url.rstrip("/")
    review_url = f"{base}/review/cases/{result.get('result_id', '')}"
    if as_json:
        print(
            json.dumps(
                {
                    "cds_base_url": f"{base}/cds-services",
                    "service_id": SERVICE_ID,
                    "patient_id": patient["id"],
                    "prefetch": prefetch,
                    "review_url": review_url,
                    "study_instance_uid": study_uid,
                    "instances_sent": report.sent,
                    "card": cards[0] if cards else None,
                },
                indent=2,
            )
        )
        return 0 if cards else 1
    print(f"sent {report.sent} instances to {settings.node_ae_title}@{settings.node_port}")
    print(f"review page: {review_url}")
    if not cards:
        print("the CDS service answered with no card", file=sys.stderr)
        return 1
    card = cards[0]
    print(f"card [{card.get('indicator')}]: {card.get('summary')}")
    print(card.get("detail", ""))
    return 0
