"""JWT trust of CDS clients over real HTTP with real signed tokens (CDS Hooks 2.0.1 §Trusting).

Every refusal is a 401 with an OperationOutcome and no detail about why.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from test_cds_support import (
    ISSUER,
    OTHER_ISSUER,
    SERVICE_PATH,
    JwksServer,
    Service,
    hook_body,
    is_operation_outcome,
    issued_card,
    jwks,
    key,
    make_token,
    patient_resource,
    running_service,
    start_service,
    stop_service,
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


def _call(svc: Service, token: str, path: str = SERVICE_PATH) -> requests.Response:
    body = hook_body(prefetch={"patient": patient_resource(), "her2": None})
    headers = {"Authorization": f"Bearer {token}"}
    if path == "/cds-services":
        return requests.get(svc.url + path, headers=headers, timeout=10)
    return requests.post(svc.url + path, json=body, headers=headers, timeout=10)


def _assert_401(response: requests.Response) -> None:
    assert response.status_code == 401
    assert is_operation_outcome(response)
    issue = response.json()["issue"][0]
    assert "diagnostics" not in issue  # no detail
    assert response.headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("kind", ["es", "rs"])
@pytest.mark.parametrize("path", ["/cds-services", SERVICE_PATH, SERVICE_PATH + "/feedback"])
def test_es384_and_rs384_accepted_on_every_endpoint(service: Service, kind: str, path: str) -> None:
    token = make_token(service.url + path, kind=kind)
    if path.endswith("/feedback"):
        card = issued_card(service)["uuid"]
        body = {
            "feedback": [
                {"card": card, "outcome": "accepted", "outcomeTimestamp": "2026-11-25T10:00:00Z"}
            ]
        }
        response = requests.post(
            service.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
    else:
        response = _call(service, token, path)
    assert response.status_code == 200, response.text


def test_audience_as_array_accepted(service: Service) -> None:
    token = make_token([service.url + SERVICE_PATH, "https://other.example.test/x"])
    assert _call(service, token).status_code == 200


def test_missing_and_malformed_authorization(service: Service) -> None:
    body = hook_body(prefetch={"patient": patient_resource()})
    _assert_401(requests.post(service.url + SERVICE_PATH, json=body, timeout=10))
    for header in ("Basic abc", "Bearer", "Bearer not.a.jwt"):
        response = requests.post(
            service.url + SERVICE_PATH, json=body, headers={"Authorization": header}, timeout=10
        )
        _assert_401(response)


def test_wrong_audience(service: Service) -> None:
    _assert_401(_call(service, make_token(service.url + "/cds-services")))  # other endpoint
    _assert_401(_call(service, make_token("https://elsewhere.example.test" + SERVICE_PATH)))


def test_audience_prefix_is_not_enough(service: Service) -> None:
    _assert_401(_call(service, make_token(service.url)))
    _assert_401(_call(service, make_token(service.url + "/cds-services/")))


def test_expired(service: Service) -> None:
    _assert_401(
        _call(service, make_token(service.url + SERVICE_PATH, iat_offset=-200, lifetime=100))
    )


def test_lifetime_too_long(service: Service) -> None:
    long = service.settings.cds_jwt_max_lifetime_seconds + 60
    _assert_401(_call(service, make_token(service.url + SERVICE_PATH, lifetime=long)))


def test_issued_in_the_future(service: Service) -> None:
    _assert_401(_call(service, make_token(service.url + SERVICE_PATH, iat_offset=600)))


def test_replayed_jti(service: Service) -> None:
    token = make_token(service.url + SERVICE_PATH)
    assert _call(service, token).status_code == 200
    _assert_401(_call(service, token))
    # same jti in a freshly signed token is a replay too
    again = make_token(
        service.url + SERVICE_PATH,
        jti=jwt.decode(token, options={"verify_signature": False})["jti"],
    )
    _assert_401(_call(service, again))


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none(service: Service) -> None:
    now = int(time.time())
    header = {"alg": "none", "typ": "JWT", "kid": key("es").kid}
    claims = {
        "iss": ISSUER,
        "aud": service.url + SERVICE_PATH,
        "iat": now,
        "exp": now + 60,
        "jti": "n1",
    }
    for token in (f"{_b64(header)}.{_b64(claims)}.", f"{_b64(header)}.{_b64(claims)}"):
        _assert_401(_call(service, token))


def test_hmac_signed_with_the_public_key(service: Service) -> None:
    """Key confusion: HS384 'signed' with the issuer's public key PEM must not verify."""
    pem = (
        key("rs")
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": service.url + SERVICE_PATH,
        "iat": now,
        "exp": now + 60,
        "jti": "h1",
    }
    import hashlib
    import hmac

    header = {"alg": "HS384", "typ": "JWT", "kid": key("rs").kid}
    signing_input = f"{_b64(header)}.{_b64(claims)}".encode()
    signature = hmac.new(pem, signing_input, hashlib.sha384).digest()
    token = signing_input.decode() + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    _assert_401(_call(service, token))


def test_alg_mismatch_with_key_type(service: Service) -> None:
    """An RS384 token naming the EC key's kid is refused (key type decides, not the token)."""
    token = make_token(service.url + SERVICE_PATH, kind="rs", headers={"kid": key("es").kid})
    _assert_401(_call(service, token))


def test_unknown_kid(service: Service) -> None:
    token = make_token(service.url + SERVICE_PATH, headers={"kid": "no-such-kid"})
    _assert_401(_call(service, token))


def test_untrusted_issuer(service: Service) -> None:
    _assert_401(_call(service, make_token(service.url + SERVICE_PATH, iss=OTHER_ISSUER)))


def test_missing_jti(service: Service) -> None:
    token = make_token(service.url + SERVICE_PATH, claims={"jti": ""})
    _assert_401(_call(service, token))


def test_jku_not_allow_listed(service: Service) -> None:
    token = make_token(
        service.url + SERVICE_PATH, headers={"jku": "https://attacker.example.test/jwks"}
    )
    _assert_401(_call(service, token))


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(document=jwks("es")).start()
    yield server
    server.stop()


def test_url_jwks_cached_and_rotated(tmp_path: Path, jwks_server: JwksServer) -> None:
    """URL JWKS: fetched once, cached, re-fetched once when an unknown kid appears (rotation)."""
    svc = start_service(
        tmp_path,
        trusted={ISSUER: {"jwks": jwks_server.url, "algorithms": ["ES384"], "tenants": ["t1"]}},
    )
    try:
        svc.app.extensions["her2low_cds"].verifier.cache.min_refetch_interval = 0.0
        ok = make_token(svc.url + SERVICE_PATH, claims={"tenant": "t1"})
        assert _call(svc, ok).status_code == 200
        assert (
            _call(svc, make_token(svc.url + SERVICE_PATH, claims={"tenant": "t1"})).status_code
            == 200
        )
        assert jwks_server.hits == 1  # cached
        # RS384 not in this issuer's algorithms
        _assert_401(
            _call(svc, make_token(svc.url + SERVICE_PATH, kind="rs", claims={"tenant": "t1"}))
        )
        # wrong tenant
        _assert_401(_call(svc, make_token(svc.url + SERVICE_PATH, claims={"tenant": "t2"})))
        # rotation: the EHR publishes a new key and signs with it
        jwks_server.document = jwks("es", "es-new")
        rotated = make_token(svc.url + SERVICE_PATH, kind="es-new", claims={"tenant": "t1"})
        assert _call(svc, rotated).status_code == 200
        hits = jwks_server.hits
        _assert_401(
            _call(
                svc,
                make_token(
                    svc.url + SERVICE_PATH, headers={"kid": "ghost"}, claims={"tenant": "t1"}
                ),
            )
        )
        assert jwks_server.hits == hits + 1  # exactly one re-fetch for the unknown kid
    finally:
        stop_service(svc)


def test_untrusted_algorithm_in_configuration_refused(tmp_path: Path) -> None:
    from cds_service.auth import TrustConfigurationError

    with pytest.raises(TrustConfigurationError, match="ES384 and RS384"):
        start_service(tmp_path, trusted={ISSUER: {"jwks": "x.json", "algorithms": ["HS256"]}})


def test_auth_disabled_for_development_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        svc = start_service(tmp_path, cds_auth_required=False)
    try:
        assert any("DISABLED" in r.getMessage() for r in caplog.records)
        body = hook_body(prefetch={"patient": patient_resource()})
        assert requests.post(svc.url + SERVICE_PATH, json=body, timeout=10).status_code == 200
    finally:
        stop_service(svc)


def test_token_never_logged(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token(service.url + SERVICE_PATH)
    with caplog.at_level("DEBUG"):
        _call(service, token)
        _call(service, token)  # replay → warning with iss/jti
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert token not in text
    assert token.split(".")[2] not in text
