"""The JWT gate of the CDS Hooks endpoints (discovery, service, feedback).

``aud`` is rebuilt from the configured public base URL plus the request path, so a token minted
for one endpoint cannot be used on another, also behind a proxy (CDS Hooks 2.0.1 §Trusting).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import g, request

from cds_service.auth import TokenRejectedError, VerifiedToken, bearer_token
from cds_service.errors import ApiError, IssueType
from cds_service.state import state

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def _unauthorized() -> ApiError:
    return ApiError(401, "", code=IssueType.LOGIN, headers={"WWW-Authenticate": "Bearer"})


def authenticate() -> VerifiedToken | None:
    """Verify the bearer JWT of the current request; None when auth is off (development)."""
    st = state()
    if not st.settings.cds_auth_required:
        return None
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        log.info("cds auth refused", extra={"reason": "no bearer"})
        raise _unauthorized()
    audience = st.base_url + request.path
    try:
        verified = st.verifier.verify(token, audience)
    except TokenRejectedError as exc:
        log.info("cds auth refused", extra={"reason": str(exc)})
        raise _unauthorized() from None
    if not st.store.use_jti(
        verified.iss, verified.jti, verified.exp, st.settings.cds_jwt_leeway_seconds
    ):
        log.warning(
            "cds auth refused",
            extra={
                "reason": "replayed jti",
                "iss": verified.iss,
                "tenant": verified.tenant,
                "jti": verified.jti,
            },
        )
        raise _unauthorized()
    log.debug(
        "cds auth ok", extra={"iss": verified.iss, "tenant": verified.tenant, "jti": verified.jti}
    )
    return verified


def jwt_required(view: Callable[P, R]) -> Callable[P, R]:
    """Decorator: refuse the call with a bare 401 unless the JWT verifies."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.cds_token = authenticate()
        return view(*args, **kwargs)

    return wrapper
