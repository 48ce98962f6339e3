"""JWT trust of CDS clients (CDS Hooks 2.0.1 §Trusting CDS Clients, RFC 7515/7519).

Issuers are allow-listed with their JWKS (file or URL) and algorithms; only ES384 and RS384 are
ever accepted and the algorithm is checked against the issuer's policy *and* the key type, never
taken from the token alone (key-confusion). The audience must equal the URL of the endpoint
called, exactly. Replay protection (``jti`` until ``exp``) is done by the caller through the
store so that it is shared by all workers.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger(__name__)


class SigningAlgorithm(StrEnum):
    """The only JWS algorithms CDS Hooks 2.0.1 lets us accept (ES384 required, RS384 allowed)."""

    ES384 = "ES384"
    RS384 = "RS384"


class TokenRejectedError(Exception):
    """Any token problem; the reason is for the log only, the client sees a bare 401."""


class TrustConfigurationError(ValueError):
    """``HER2LOW_CDS_TRUSTED_ISSUERS`` is malformed."""


@dataclass(frozen=True)
class IssuerPolicy:
    """What one trusted issuer may present."""

    issuer: str
    jwks: str  # file path or http(s) URL
    algorithms: frozenset[SigningAlgorithm] = frozenset(SigningAlgorithm)
    tenants: frozenset[str] = frozenset()  # empty: any (or none)
    jku: frozenset[str] = frozenset()  # extra JWKS URLs allowed in the ``jku`` header


@dataclass(frozen=True)
class VerifiedToken:
    """The claims we keep after verification (nothing else is logged or stored)."""

    iss: str
    jti: str
    exp: int
    tenant: str | None = None
    sub: str | None = None


def parse_trusted_issuers(config: Mapping[str, Any]) -> dict[str, IssuerPolicy]:
    """Turn the settings mapping (issuer → JWKS string, or object) into policies."""
    policies: dict[str, IssuerPolicy] = {}
    for issuer, value in config.items():
        if isinstance(value, str):
            policies[issuer] = IssuerPolicy(issuer=issuer, jwks=value)
            continue
        if not isinstance(value, Mapping) or not isinstance(value.get("jwks"), str):
            raise TrustConfigurationError(
                f"HER2LOW_CDS_TRUSTED_ISSUERS[{issuer!r}]: expected a JWKS path/URL or "
                '{"jwks": ..., "algorithms": [...], "tenants": [...]}'
            )
        try:
            algorithms = frozenset(
                SigningAlgorithm(a)
                for a in value.get("algorithms", [a.value for a in SigningAlgorithm])
            )
        except ValueError as exc:
            raise TrustConfigurationError(
                f"HER2LOW_CDS_TRUSTED_ISSUERS[{issuer!r}].algorithms: only ES384 and RS384 are "
                "allowed"
            ) from exc
        if not algorithms:
            raise TrustConfigurationError(f"HER2LOW_CDS_TRUSTED_ISSUERS[{issuer!r}]: no algorithm")
        policies[issuer] = IssuerPolicy(
            issuer=issuer,
            jwks=value["jwks"],
            algorithms=algorithms,
            tenants=frozenset(str(t) for t in value.get("tenants", [])),
            jku=frozenset(str(u) for u in value.get("jku", [])),
        )
    return policies


def _is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


@dataclass
class _CachedSet:
    keys: dict[str, jwt.PyJWK]
    fetched_at: float


@dataclass
class JwksCache:
    """Keys by (source, kid); URL sets expire after ``ttl``, re-fetched once on an unknown kid."""

    ttl: float = 300.0
    min_refetch_interval: float = 5.0
    timeout: float = 3.0
    _sets: dict[str, _CachedSet] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _load(self, source: str) -> dict[str, jwt.PyJWK]:
        if _is_url(source):
            response = requests.get(source, timeout=self.timeout)
            response.raise_for_status()
            data = response.json()
        else:
            data = json.loads(Path(source).read_text())
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry["kid"]] = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
        return keys

    def _refresh(self, source: str) -> _CachedSet:
        try:
            cached = _CachedSet(self._load(source), time.monotonic())
        except (OSError, ValueError, requests.RequestException) as exc:
            raise TokenRejectedError(f"JWKS unavailable ({type(exc).__name__})") from exc
        self._sets[source] = cached
        return cached

    def get(self, source: str, kid: str) -> jwt.PyJWK:
        with self._lock:
            cached = self._sets.get(source)
            now = time.monotonic()
            if cached is None or (_is_url(source) and now - cached.fetched_at > self.ttl):
                cached = self._refresh(source)
            key = cached.keys.get(kid)
            if (
                key is None
                and _is_url(source)
                and now - cached.fetched_at >= self.min_refetch_interval
            ):
                cached = self._refresh(source)  # rotation: one re-fetch on unknown kid
                key = cached.keys.get(kid)
        if key is None:
            raise TokenRejectedError("unknown kid")
        return key


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _segment(text: str) -> dict[str, Any]:
    """One base64url JSON object segment (strict alphabet), decoded without verification."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload before verification, decoded once, only to pick policy and key.

    PyJWT's ``decode`` re-parses and checks everything; this replaces a second full parse
    (``get_unverified_header``) plus a third decode of the payload on every call.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWS compact serialisation")
    return _segment(parts[0]), _segment(parts[1])


def _key_matches(alg: SigningAlgorithm, key: jwt.PyJWK) -> bool:
    material = key.key
    if key._jwk_data.get("alg") not in (None, alg.value):
        return False
    if alg is SigningAlgorithm.ES384:
        return isinstance(material, ec.EllipticCurvePublicKey) and isinstance(
            material.curve, ec.SECP384R1
        )
    return isinstance(material, rsa.RSAPublicKey) and material.key_size >= 2048


class TokenVerifier:
    """Verify a bearer JWT for one endpoint URL (``aud``)."""

    def __init__(
        self,
        policies: Mapping[str, IssuerPolicy],
        *,
        max_lifetime: int,
        leeway: int,
        cache: JwksCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policies = dict(policies)
        self.max_lifetime = max_lifetime
        self.leeway = leeway
        self.cache = cache or JwksCache()
        self.clock = clock

    def verify(self, token: str, audience: str) -> VerifiedToken:
        """Return the verified claims or raise TokenRejectedError."""
        try:
            header, unverified = _unverified_parts(token)
        except (ValueError, RecursionError) as exc:  # binascii/JSON/Unicode errors are ValueErrors
            raise TokenRejectedError("malformed") from exc
        iss = unverified.get("iss")
        policy = self.policies.get(iss) if isinstance(iss, str) else None
        if policy is None:
            raise TokenRejectedError("untrusted issuer")
        try:
            alg = SigningAlgorithm(str(header.get("alg")))
        except ValueError as exc:
            raise TokenRejectedError("algorithm not allowed") from exc
        if alg not in policy.algorithms:
            raise TokenRejectedError("algorithm not allowed for issuer")
        typ = header.get("typ")
        if typ is not None and str(typ).upper() != "JWT":
            raise TokenRejectedError("typ")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejectedError("no kid")
        source = policy.jwks
        jku = header.get("jku")
        if jku is not None:
            if jku != policy.jwks and jku not in policy.jku:
                raise TokenRejectedError("jku not allow-listed")
            source = jku
        key = self.cache.get(source, kid)
        if not _key_matches(alg, key):
            raise TokenRejectedError("key type does not match algorithm")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg.value],
                audience=audience,
                issuer=policy.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "jti", "iss", "aud"], "verify_iat": True},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejectedError(type(exc).__name__) from exc
        exp, iat, jti = claims["exp"], claims["iat"], claims["jti"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise TokenRejectedError("exp/iat not numeric")
        if exp - iat > self.max_lifetime:
            raise TokenRejectedError("lifetime too long")
        if iat > self.clock() + self.leeway:
            raise TokenRejectedError("issued in the future")
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise TokenRejectedError("jti")
        tenant = claims.get("tenant")
        if policy.tenants and tenant not in policy.tenants:
            raise TokenRejectedError("tenant not allowed")
        sub = claims.get("sub")
        return VerifiedToken(
            iss=policy.issuer,
            jti=jti,
            exp=int(exp),
            tenant=tenant if isinstance(tenant, str) else None,
            sub=sub if isinstance(sub, str) else None,
        )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
