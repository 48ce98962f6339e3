"""A local stand-in EHR identity for the demo: its own ES384 key, JWKS and signed hook tokens.

Generated once per installation into ``$HER2LOW_HOME/secrets`` (0600). It is trusted only when
``her2low up`` runs with the demo enabled and no issuers are configured; it is never a published
key, so it is not the public-sandbox risk the CDS Hooks notes warn about.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ISSUER = "urn:her2low:demo-ehr"
KID = "demo-ehr-1"


def _paths(home: Path) -> tuple[Path, Path]:
    folder = home / "secrets"
    return folder / "demo-ehr-key.pem", folder / "demo-ehr-jwks.json"


def ensure_keys(home: Path) -> Path:
    """Create the demo key pair if missing; returns the JWKS path."""
    key_path, jwks_path = _paths(home)
    if key_path.exists() and jwks_path.exists():
        return jwks_path
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ec.generate_private_key(ec.SECP384R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": KID, "alg": "ES384", "use": "sig"})
    jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2))
    return jwks_path


def token(home: Path, audience: str, *, lifetime: int = 120) -> str:
    """A CDS Hooks 2.0 client JWT for ``audience`` (the exact endpoint URL)."""
    key_path, _ = _paths(home)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(
        claims, key_path.read_bytes(), algorithm="ES384", headers={"kid": KID, "typ": "JWT"}
    )
