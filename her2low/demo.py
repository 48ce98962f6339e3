"""``her2low demo``: the synthetic study through a running system, as an EHR integrator sees it.

Writes (once) the synthetic study, sends it to the node over a real DICOM association, waits for
the published result, then calls the CDS service exactly as an EHR would: a ``patient-view``
request with prefetch and a signed JWT. Prints the card (and, with ``--json``, everything an
integrator needs to repeat the call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
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
    """The demo study's folder, written by the synthetic generator on first use.

    Each run writes into a folder of its own and publishes it with one atomic rename, so a
    ``her2low demo`` started while ``up``'s demo is still writing never meets a half-written
    folder (the study is the same for the same seed).
    """
    out = settings.home / "demo" / f"study-seed{seed}"
    if (out / "manifest.json").exists():
        return out
    from dicom_node.synth import write_study

    out.parent.mkdir(parents=True, exist_ok=True)
    own = Path(tempfile.mkdtemp(prefix=f".study-seed{seed}-", dir=out.parent))
    try:
        write_study(own, seed=seed, lesion="mass", snr=30.0, vendor="siemens")
        os.rename(own, out)
    except OSError:
        if (out / "manifest.json").exists():  # another run published it first
            shutil.rmtree(own, ignore_errors=True)
            return out
        if (own / "manifest.json").exists():  # a stale folder from an older version: use ours
            return own
        shutil.rmtree(own, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(own, ignore_errors=True)
        raise
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


def hook_endpoint(settings: Settings) -> str:
    """The hook's URL as the EHR calls it: the JWT audience."""
    return f"{settings.cds_public_base_url.rstrip('/')}/cds-services/{SERVICE_ID}"


class HookRefused(Exception):
    """The CDS service answered the hook call with an error status."""


def call_hook(
    settings: Settings, patient: dict[str, Any], prefetch: dict[str, Any]
) -> dict[str, Any]:
    endpoint = hook_endpoint(settings)
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
    if response.status_code in (401, 403):
        raise HookRefused(
            f"the CDS service refused the demo EHR's token ({response.status_code}): it trusts "
            f"{demo_ehr.ISSUER} only when `her2low up` runs with the demo, or when "
            "HER2LOW_CDS_TRUSTED_ISSUERS names it"
        )
    if not response.ok:
        raise HookRefused(f"the CDS service answered the hook with {response.status_code}")
    return dict(response.json())


def _node_address(settings: Settings) -> str:
    return f"{settings.node_ae_title}@{_local(settings.node_host)}:{settings.node_port}"


def _demo_users(settings: Settings) -> dict[str, dict[str, str]]:
    """The review-app demo accounts ``her2low up`` made ({role: {username, password}})."""
    from cds_service.accounts import read_demo_users

    return read_demo_users(settings.home)


def demo(
    settings: Settings, *, as_json: bool = False, timeout: float = 120.0, seed: int = 7
) -> int:
    """Send the demo study, wait for its result, call the hook; 0 when a card came back.

    Progress goes to stdout, or to stderr with ``as_json`` (stdout is then one JSON object).
    """
    progress = sys.stderr if as_json else sys.stdout
    # pynetdicom logs a refused association as ERROR events; the one line below says it better
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    def say(message: str) -> None:
        print(message, file=progress, flush=True)

    say(f"writing (or reusing) the synthetic demo study under {settings.home / 'demo'} ...")
    folder = demo_study(settings, seed)
    files = study_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    say(f"sending {len(files)} instances to {_node_address(settings)} ...")
    try:
        report = send_files(
            files, _local(settings.node_host), settings.node_port, called_aet=settings.node_ae_title
        )
    except (ConnectionError, OSError) as exc:
        print(
            f"her2low demo: error: the DICOM node did not accept the association ({exc}); is it "
            "running, and does HER2LOW_NODE_ALLOWED_CALLING_AETS allow HER2LOW-DEMO?",
            file=sys.stderr,
        )
        return 1
    if report.failed:
        print(
            f"her2low demo: error: {len(report.failed)} instances refused: {report.failed}",
            file=sys.stderr,
        )
        return 1
    say(f"sent {report.sent} instances to {_node_address(settings)}")
    study_uid = str(first.StudyInstanceUID)
    say(f"waiting up to {timeout:.0f} s for the analysis of study {study_uid} ...")
    try:
        result = wait_for_result(settings, study_uid, timeout)
    except TimeoutError as exc:
        print(f"her2low demo: error: {exc}", file=sys.stderr)
        return 1
    patient = patient_resource(first, settings)
    prefetch: dict[str, Any] = {"patient": patient, "her2": None, "imaging": None}
    say(f"calling {hook_endpoint(settings)} as the demo EHR ...")
    try:
        answer = call_hook(settings, patient, prefetch)
    except (HookRefused, requests.RequestException) as exc:
        print(f"her2low demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
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
                    "demo_users": _demo_users(settings),
                },
                indent=2,
            )
        )
        if not cards:
            print("her2low demo: error: the CDS service answered with no card", file=sys.stderr)
        return 0 if cards else 1
    print(f"review page: {review_url}")
    if not cards:
        print("her2low demo: error: the CDS service answered with no card", file=sys.stderr)
        return 1
    card = cards[0]
    print(f"card [{card.get('indicator')}]: {card.get('summary')}")
    print(card.get("detail", ""))
    return 0


def cmd_token(settings: Settings, *, audience: str | None, lifetime: int) -> int:
    """Print a bearer token signed with the demo EHR key, for calling the hook by hand (curl)."""
    if lifetime < 1:
        print("her2low demo token: error: --lifetime must be 1 second or more", file=sys.stderr)
        return 2
    demo_ehr.ensure_keys(settings.home)
    print(demo_ehr.token(settings.home, audience or hook_endpoint(settings), lifetime=lifetime))
    return 0


HELP = "send the synthetic study to a running system and show the card (or: demo token)"
DESCRIPTION = (
    "Send the synthetic demo study to the running node over a real DICOM association, wait for "
    "its analysis, then call the CDS service as the local demo EHR would (patient-view with "
    "prefetch and a signed JWT) and print the card. With --json, stdout is one JSON object with "
    "everything an integrator needs to repeat the call, and progress goes to stderr.\n\n"
    "`her2low demo token` prints a bearer token of the demo EHR for calling the hook by hand "
    "(see docs/cds-hooks.md); the service trusts it while `her2low up` runs with the demo."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object for EHR integrators"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the analysis"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic study")
    sub = parser.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    token = sub.add_parser(
        "token",
        help="print a bearer token of the demo EHR (for curl)",
        description="Print a CDS Hooks client JWT signed with the local demo EHR key "
        f"(issuer {demo_ehr.ISSUER}) for one endpoint URL. Each token has its own jti: use it "
        "once, within its lifetime.",
        formatter_class=parser.formatter_class,
    )
    token.add_argument(
        "--audience",
        default=None,
        help="endpoint URL the token is for (default: the hook, "
        "HER2LOW_CDS_PUBLIC_BASE_URL/cds-services/her2low-mri)",
    )
    token.add_argument(
        "--lifetime", type=int, default=120, help="seconds until the token expires (≤ 300)"
    )


def run(args: argparse.Namespace) -> int:
    from her2low.core.commands import configured_settings

    settings = configured_settings()
    if args.demo_command == "token":
        return cmd_token(settings, audience=args.audience, lifetime=args.lifetime)
    return demo(settings, as_json=args.json, timeout=args.timeout, seed=args.seed)


COMMANDS = {"demo": (HELP, DESCRIPTION, add_arguments, run)}
