"""A tiny FHIR R4 server for tests: a stand-in for an EHR's FHIR server.

Serves Patient reads and Observation/ImagingStudy searches from in-memory resources on a free
loopback port, and answers 401 unless the request carries ``Authorization: Bearer <token>``.
It records the requests it saw so tests can check what the CDS service fetched. Not a FHIR
implementation: only what the CDS service's prefetch templates ask for.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response


@dataclass
class FhirTestServer:
    """Resources by type; ``token`` is the only bearer token accepted."""

    token: str
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    observations: list[dict[str, Any]] = field(default_factory=list)
    imaging_studies: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    delay_seconds: float = 0.0
    _server: BaseWSGIServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}/fhir"

    def start(self) -> FhirTestServer:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _json(self, body: dict[str, Any], status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, mimetype="application/fhir+json")

    def _bundle(self, resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        }

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        self.requests.append(request.full_path)
        if self.delay_seconds:
            threading.Event().wait(self.delay_seconds)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login"}],
            }
            return self._json(outcome, 401)(environ, start_response)
        parts = request.path.strip("/").split("/")
        if parts[:1] != ["fhir"] or len(parts) < 2:
            return self._json({"resourceType": "OperationOutcome"}, 404)(environ, start_response)
        kind = parts[1]
        patient = request.args.get("patient", "")
        if kind == "Patient" and len(parts) == 3:
            found = self.patients.get(parts[2])
            if found is None:
                response = self._json({"resourceType": "OperationOutcome"}, 404)
            else:
                response = self._json(found)
        elif kind == "Observation":
            codes = set(request.args.get("code", "").split(","))
            matches = [
                o
                for o in self.observations
                if o.get("subject", {}).get("reference") == f"Patient/{patient}"
                and any(
                    f"{c.get('system')}|{c.get('code')}" in codes
                    for c in o.get("code", {}).get("coding", [])
                )
            ]
            response = self._json(self._bundle(matches))
        elif kind == "ImagingStudy":
            matches = [
                s
                for s in self.imaging_studies
                if s.get("subject", {}).get("reference") == f"Patient/{patient}"
            ]
            response = self._json(self._bundle(matches))
        else:
            response = self._json({"resourceType": "OperationOutcome"}, 404)
        return response(environ, start_response)
