"""Fuzz the CDS Hooks endpoints against cds_service/openapi.yaml with schemathesis (auth off).

Checks that no generated input (valid or not) produces a 5xx, and that every response matches
the documented status codes, content types and schemas. Bounded: a fixed number of examples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from test_cds_support import RESULTS_TOKEN, result_payload, start_service, stop_service

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "cds_service" / "openapi.yaml"


def test_openapi_document_is_valid_yaml() -> None:
    doc = yaml.safe_load(SPEC.read_text())
    assert set(doc["paths"]) == {
        "/cds-services",
        "/cds-services/{service_id}",
        "/cds-services/{service_id}/feedback",
        "/api/v1/exports",  # results in the PACS (docs/results-api.md), results token
        "/api/v1/assessments",
    }


def test_schemathesis_fuzz(tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is not installed in the virtualenv (pip install schemathesis)"
    # Generated fhirServer URLs must never be contacted: only loopback port 9 (discard, closed).
    svc = start_service(
        tmp_path, cds_auth_required=False, cds_fhir_server_allowlist=["http://127.0.0.1:9/"]
    )
    try:
        svc.publish(result_payload())
        run = subprocess.run(
            [
                exe,
                "run",
                str(SPEC),
                "--url",
                svc.url,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                "--max-examples",
                "40",
                "--phases",
                "examples,coverage,fuzzing",
                "--seed",
                "20261125",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                # the results-API paths take the results token (ignored by the hooks, auth off)
                "--header",
                f"Authorization: Bearer {RESULTS_TOKEN}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # schemathesis keeps a .schemathesis/ folder in its working directory
            timeout=540,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    finally:
        stop_service(svc)
