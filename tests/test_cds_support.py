"""Shared helpers of the CDS service tests (no tests here): keys, tokens, servers, payloads.

Imported by the ``test_cds_*`` modules (fixtures are re-exported by import). Everything binds
port 0 on 127.0.0.1 and lives under ``tmp_path``, so tests are parallel-safe.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from werkzeug.serving import BaseWSGIServer, make_server

from cds_service.app import create_app
from cds_service.db import MIGRATIONS
from her2low.core.settings import Settings
from models.contract import (
    DEFAULT_CONVENTIONS,
    DEFAULT_FIT,
    PIPELINE_VERSION,
    AnalysisConventions,
    SettingsMismatchError,
)
from models.prediction import Contribution, ModelVariant, Prediction

ISSUER = "https://ehr.example.test"
OTHER_ISSUER = "https://untrusted.example.test"
RESULTS_TOKEN = "results-token-for-tests-0123456789"
PATIENT_SYSTEM = "urn:oid:1.2.3.4.5"
PATIENT_ISSUER = "HOSP"
SERVICE_PATH = "/cds-services/her2low-mri"


# --- keys and tokens --------------------------------------------------------------------------


@dataclass
class KeyPair:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = (
            jwt.algorithms.ECAlgorithm if self.alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
        )
        data = json.loads(algo.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data


_KEYS: dict[str, KeyPair] = {}


def key(kind: str) -> KeyPair:
    """Session-wide keys: 'es' (ES384, P-384), 'rs' (RS384, 2048-bit), 'es-new' (rotation)."""
    if kind not in _KEYS:
        if kind.startswith("es"):
            _KEYS[kind] = KeyPair(f"{kind}-kid", "ES384", ec.generate_private_key(ec.SECP384R1()))
        else:
            _KEYS[kind] = KeyPair(
                f"{kind}-kid",
                "RS384",
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
            )
    return _KEYS[kind]


def jwks(*kinds: str) -> dict[str, Any]:
    return {"keys": [key(k).public_jwk() for k in kinds]}


def make_token(
    aud: str | list[str],
    *,
    kind: str = "es",
    iss: str = ISSUER,
    lifetime: int = 60,
    iat_offset: int = 0,
    jti: str | None = None,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    pair = key(kind)
    now = int(time.time()) + iat_offset
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or str(uuid.uuid4()),
        "sub": "client-app",
    }
    payload.update(claims or {})
    header = {"kid": pair.kid, "typ": "JWT"}
    header.update(headers or {})
    return jwt.encode(payload, pair.private, algorithm=pair.alg, headers=header)


# --- a fake predictor (until/besides models.runtime) -------------------------------------------


class FakePredictor:
    """A deterministic stand-in with the ModelRuntime contract (variant by available inputs)."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(
        self,
        inputs: Mapping[str, str | float | None],
        *,
        conventions: AnalysisConventions | None = None,
    ) -> Prediction:
        self.calls += 1
        from models import schema

        if conventions is not None:  # trained, like the reference model, with the defaults
            differences = DEFAULT_CONVENTIONS.differences(conventions)
            if differences:
                raise SettingsMismatchError(differences)

        present = {k: v for k, v in inputs.items() if v is not None and v != ""}
        desc = [n for n in schema.DESCRIPTOR_NAMES if n in present]
        quant = [n for n in schema.QUANTITATIVE_NAMES if n in present]
        if desc and quant:
            variant = ModelVariant.COMBINED
        elif desc:
            variant = ModelVariant.DESCRIPTORS
        else:
            variant = ModelVariant.QUANTITATIVE
        log_odds = 0.0
        contributions = []
        if "adc_mean" in present:
            term = (1.1e-3 - float(present["adc_mean"])) * 4000  # type: ignore[arg-type]
            contributions.append(Contribution("adc_mean", float(present["adc_mean"]), term))  # type: ignore[arg-type]
            log_odds += term
        if present.get("mass_shape") == "irregular":
            contributions.append(Contribution("mass_shape", "irregular", 0.9))
            log_odds += 0.9
        if present.get("kapp_mean") is not None:
            term = (float(present["kapp_mean"]) - 0.8) * 2  # type: ignore[arg-type]
            contributions.append(Contribution("kapp_mean", float(present["kapp_mean"]), term))  # type: ignore[arg-type]
            log_odds += term
        p = 1 / (1 + math.exp(-log_odds))
        contributions.sort(key=lambda c: -abs(c.log_odds))
        used = tuple(desc + quant)
        missing = tuple(
            n for n in (*schema.DESCRIPTOR_NAMES, *schema.QUANTITATIVE_NAMES) if n not in present
        )
        return Prediction(
            probability=p,
            classes=("zero", "low", "over"),
            probabilities=(1 - p, p * 0.8, p * 0.2),
            threshold=0.5,
            model_name="fake-her2low",
            model_version="0.0-test",
            variant=variant,
            reference=True,
            onnx_sha256="0" * 64,
            inputs_used=used,
            inputs_missing=missing,
            contributions=tuple(contributions),
        )


# --- payloads ---------------------------------------------------------------------------------


PNG_1x1 = base64.b64encode(
    base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
).decode()


def result_payload(
    *,
    patient_id: str = "MRN-1",
    issuer: str = PATIENT_ISSUER,
    series: str | None = None,
    study: str = "1.2.826.0.1.3680043.8.498.1",
    adc_mean: float = 0.00095,
    laterality: str | None = "L",
    previews: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "api_version": 1,
        "pipeline_version": PIPELINE_VERSION,
        "study_instance_uid": study,
        "series_instance_uid": series or f"1.2.826.0.1.3680043.8.498.{uuid.uuid4().int % 10**12}",
        "accession_number": "A123",
        "patient": {"id": patient_id, "issuer": issuer},
        "acquired_at": "2026-11-25T10:00:00Z",
        "laterality": laterality,
        "features": {"adc_mean": adc_mean, "dapp_mean": 0.0012, "kapp_mean": 0.95, "adc_p5": None},
        "provenance": {
            "b_values": [0, 50, 800, 1000, 1500, 2000],
            "fit": {  # the node's default analysis, which the reference model assumes
                "method": DEFAULT_FIT.method,
                "dki_bmin": 0,
                "bounds": {"dapp": [0, 0.0035], "kapp": [0, 3]},
                "denoise": DEFAULT_FIT.denoise,
            },
            "adc_b_values": [0, 800],
            "discretisation": {
                "bin_width": {"adc": 2.5e-05, "dapp": 2.5e-05, "kapp": 0.025},
                "bin_min": 0,
            },
            "statistics": {"kurtosis": "excess", "percentile_rule": "linear", "entropy_base": 2},
            "roi": {"source": "seg", "confirmed": True, "voxels": 512, "volume_ml": 1.9},
            "qc": {"flags": {"at_bound": 3, "low_signal": 0}, "problems": []},
        },
    }
    if previews:
        body["previews"] = {"dwi_b800": PNG_1x1}
    return body


#: A complete set of DKI histogram features with typical breast-tumour values.
FULL_FEATURES = {
    "adc_mean": 0.00105,
    "adc_median": 0.00103,
    "adc_p5": 0.0007,
    "adc_p95": 0.0014,
    "adc_skewness": 0.3,
    "adc_kurtosis": 0.5,
    "adc_entropy": 4.1,
    "dapp_mean": 0.0013,
    "dapp_median": 0.00128,
    "dapp_p5": 0.0009,
    "dapp_p95": 0.0018,
    "dapp_skewness": 0.2,
    "dapp_kurtosis": 0.4,
    "dapp_entropy": 4.3,
    "kapp_mean": 0.85,
    "kapp_median": 0.84,
    "kapp_p5": 0.55,
    "kapp_p95": 1.2,
    "kapp_skewness": 0.1,
    "kapp_kurtosis": 0.2,
    "kapp_entropy": 3.9,
}


MASS_DESCRIPTORS = {
    "lesion_type": "mass",
    "mass_shape": "irregular",
    "mass_margin": "spiculated",
    "mass_internal_enhancement": "heterogeneous",
    "t2_hyperintensity": "no",
    "peritumoral_edema": "yes",
}


def patient_resource(
    pid: str = "pat-1", mrn: str = "MRN-1", system: str = PATIENT_SYSTEM
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": system, "value": mrn}],
        "name": [{"family": "Test"}],
    }


def her2_bundle(pid: str = "pat-1", text: str | None = "Negative (0)") -> dict[str, Any] | None:
    if text is None:
        return None
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "48676-1"}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "effectiveDateTime": "2026-11-01",
                    "valueCodeableConcept": {"text": text},
                }
            }
        ],
    }


def hook_body(
    pid: str = "pat-1", prefetch: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/doc-1", "patientId": pid},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


# --- servers ------------------------------------------------------------------------------------


class _Holder:
    def __init__(self) -> None:
        self.app: Callable[..., Any] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        assert self.app is not None
        return self.app(environ, start_response)


@dataclass
class JwksServer:
    """Serves a mutable JWKS document (for URL JWKS and rotation tests)."""

    document: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    _server: BaseWSGIServer | None = None

    def start(self) -> JwksServer:
        def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
            self.hits += 1
            body = json.dumps(self.document).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]

        self._server = make_server("127.0.0.1", 0, wsgi, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}/jwks.json"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class Service:
    """The CDS service running under a real werkzeug server on a free port."""

    url: str
    settings: Settings
    predictor: FakePredictor | None
    server: BaseWSGIServer
    app: Any

    def token(self, path: str = SERVICE_PATH, **kwargs: Any) -> str:
        return make_token(self.url + path, **kwargs)

    def auth(self, path: str = SERVICE_PATH, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(path, **kwargs)}"}

    def post_hook(self, body: Any, **kwargs: Any) -> requests.Response:
        return requests.post(
            self.url + SERVICE_PATH, json=body, headers=self.auth(), timeout=10, **kwargs
        )

    def publish(self, body: dict[str, Any]) -> requests.Response:
        return requests.post(
            self.url + "/api/v1/results",
            json=body,
            headers={"Authorization": f"Bearer {RESULTS_TOKEN}"},
            timeout=10,
        )

    def put_descriptors(
        self, result_id: str, values: dict[str, Any], confirmed: bool = True
    ) -> requests.Response:
        return requests.put(
            f"{self.url}/api/v1/cases/{result_id}/descriptors",
            json={"values": values, "roi_confirmed": confirmed, "entered_by": "dr-radiologist"},
            headers={"Authorization": f"Bearer {RESULTS_TOKEN}"},
            timeout=10,
        )


def start_service(
    tmp_path: Path,
    *,
    predictor: Any = "fake",
    trusted: dict[str, Any] | None = None,
    **overrides: Any,
) -> Service:
    """Migrate a fresh SQLite database, start the app on a free port, return its handle."""
    holder = _Holder()
    server = make_server("127.0.0.1", 0, holder, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(jwks("es", "rs")))
    values: dict[str, Any] = {
        "home": tmp_path,
        "cds_db_url": f"sqlite:///{tmp_path / 'cds.db'}",
        "cds_public_base_url": url,
        "cds_trusted_issuers": trusted if trusted is not None else {ISSUER: str(jwks_path)},
        "results_api_token": RESULTS_TOKEN,
        "cds_patient_id_systems": {PATIENT_ISSUER: PATIENT_SYSTEM},
        "cds_fhir_timeout_seconds": 2.0,
    }
    values.update(overrides)
    settings = Settings(**values)
    MIGRATIONS.upgrade(settings.cds_database_url)
    fake = FakePredictor() if predictor == "fake" else None
    app = create_app(settings, runtime=fake if predictor == "fake" else predictor)
    holder.app = app
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Service(url=url, settings=settings, predictor=fake, server=server, app=app)


def stop_service(service: Service) -> None:
    service.server.shutdown()
    service.server.server_close()
    service.app.extensions["her2low_cds"].engine.dispose()


def running_service(tmp_path: Path) -> Iterator[Service]:
    """Body of the ``service`` fixture each test module declares."""
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


def running_fhir_server() -> Iterator[Any]:
    """Body of the ``fhir_server`` fixture: the EHR FHIR server stand-in."""
    from fhir_test_server import FhirTestServer

    server = FhirTestServer(token="ehr-access-token").start()
    yield server
    server.stop()


def walk_empty(value: Any, path: str = "$") -> list[str]:
    """Paths of null / "" / [] / {} values anywhere in a JSON document.

    The one exception CDS Hooks 2.0.1 requires: ``{"cards": []}`` when there is no guidance.
    """
    found: list[str] = []
    if path == "$.cards" and value == []:
        return found
    if value is None or value == "" or value == [] or value == {}:
        found.append(path)
    elif isinstance(value, dict):
        for k, v in value.items():
            found += walk_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += walk_empty(v, f"{path}[{i}]")
    return found


def issued_card(service: Service, **payload: Any) -> dict[str, Any]:
    """Publish a result and call the hook once: the card the service issued (for feedback)."""
    published = service.publish(result_payload(**payload))
    assert published.status_code == 201, published.text
    answer = service.post_hook(hook_body(prefetch={"patient": patient_resource(), "her2": None}))
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    return dict(card)


def is_operation_outcome(response: requests.Response) -> bool:
    body = response.json()
    return (
        response.headers.get("Content-Type", "").startswith("application/json")
        and body.get("resourceType") == "OperationOutcome"
        and bool(body.get("issue"))
    )


# --- the review app, signed in ------------------------------------------------------------------

REVIEW_PASSWORD = "a-long-test-password-1"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    """The CSRF token of the first form of a review page."""
    match = _CSRF.search(html)
    assert match, "no csrf_token field on the page"
    return match.group(1)


def add_review_user(app: Any, username: str, role: str, password: str = REVIEW_PASSWORD) -> None:
    """Create a review-app account directly (what ``her2low user add`` does)."""
    app.extensions["her2low_review"].accounts.add_user(username, role, password)


class ReviewClient:
    """A browser-like ``requests`` session signed in to a running service's review app.

    ``post`` adds the page's CSRF token, as the forms do; ``post_raw`` sends exactly ``data``.
    """

    def __init__(self, service: Service, role: str = "radiologist", username: str = "") -> None:
        self.url = service.url
        self.username = username or f"dr-{role}"
        if service.app.extensions["her2low_review"].accounts.user(self.username) is None:
            add_review_user(service.app, self.username, role)
        self.http = requests.Session()
        page = self.http.get(self.url + "/review/sign-in", timeout=10)
        signed = self.http.post(
            self.url + "/review/sign-in",
            data={
                "username": self.username,
                "password": REVIEW_PASSWORD,
                "csrf_token": csrf_token(page.text),
            },
            timeout=10,
            allow_redirects=False,
        )
        assert signed.status_code == 303, signed.text
        self.csrf = csrf_token(self.http.get(self.url + "/review/", timeout=10).text)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.http.get(url, timeout=10, **kwargs)

    def post(self, url: str, data: dict[str, Any], **kwargs: Any) -> requests.Response:
        return self.http.post(url, data={**data, "csrf_token": self.csrf}, timeout=10, **kwargs)

    def post_raw(self, url: str, data: dict[str, Any], **kwargs: Any) -> requests.Response:
        return self.http.post(url, data=data, timeout=10, **kwargs)
