"""A tiny FHIR R4 server for tests: a stand-in for an EHR's FHIR server.

Serves Patient reads and Observation/ImagingStudy searches from in-memory resources on a free
loopback port, accepts a transaction Bundle POSTed to the base (creates, ``ifNoneExist`` by
identifier honoured), and answers 401 unless the request carries ``Authorization: Bearer <token>``.
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
    # POST [base] of a transaction Bundle (the CDS service's write-back)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    fail_transactions: int = 0  # answer this many transactions with 503 first
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
        if request.method == "POST" and parts == ["fhir"]:
            return self._transaction(request)(environ, start_response)
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

    def _transaction(self, request: Request) -> Response:
        """POST [base] with a transaction Bundle: all entries created, or none (FHIR R4 §3.1.0.11)."""
        try:
            bundle = json.loads(request.get_data())
        except ValueError:
            return self._json({"resourceType": "OperationOutcome"}, 400)
        if not isinstance(bundle, dict) or bundle.get("type") != "transaction":
            return self._json({"resourceType": "OperationOutcome"}, 400)
        self.transactions.append(bundle)
        if self.fail_transactions > 0:
            self.fail_transactions -= 1
            return self._json({"resourceType": "OperationOutcome"}, 503)
        answers = []
        for entry in bundle.get("entry", []):
            resource, req = entry["resource"], entry["request"]
            condition = req.get("ifNoneExist", "")
            existing = next(
                (r for r in self.created if condition and _matches(r, req["url"], condition)), None
            )
            if existing is None:
                existing = dict(resource, id=str(len(self.created) + 1))
                self.created.append(existing)
                status = "201 Created"
            else:
                status = "200 OK"
            location = f"{existing['resourceType']}/{existing['id']}/_history/1"
            answers.append({"response": {"status": status, "location": location}})
        return self._json(
            {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        )


def _matches(resource: dict[str, Any], kind: str, condition: str) -> bool:
    """``identifier=system|value`` against a stored resource of type ``kind``."""
    name, _, wanted = condition.partition("=")
    if name != "identifier" or resource.get("resourceType") != kind:
        return False
    return any(
        f"{i.get('system')}|{i.get('value')}" == wanted for i in resource.get("identifier", [])
    )
