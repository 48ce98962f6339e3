"""The JWT gate of the CDS Hooks endpoints (discovery, service, feedback).

``aud`` is rebuilt from the configured public base URL plus the request path, so a token minted
for one endpoint cannot be used on another, also behind a proxy (CDS Hooks 2.0.1 §Trusting).

Every call's signature and claims are verified before the view runs. The ``jti`` replay record
is kept in the database (shared by workers and instances). ``jwt_required`` records it before the
view; ``jwt_required_deferred`` (the read-only hook call) records it together with the call's
audit events in one transaction through ``commit_call`` — before any card leaves and before any
other write — which saves a commit per call without letting a replay through. The deferred call
also runs its lookup on the same pooled connection (``call_connection``), so a call checks out
one connection; on PostgreSQL that connection is in autocommit and the jti + audit write is one
statement (``Store.hook_connection``).

A deferred call may answer from this process's earlier lookup of the same patient
(``lookup_rows``, ``store.lookup_cache``); its ``commit_call`` then records the jti only if the
database's hook generation is still that lookup's. If it is not, nothing was written and the
wrapper runs the view once more on a fresh lookup, so a reused lookup never outlives a change.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import ParamSpec, TypeVar

from flask import g, request

from cds_service.auth import TokenRejectedError, VerifiedToken, bearer_token
from cds_service.errors import ApiError, IssueType
from cds_service.state import state
from cds_service.store import AuditTuple, HookRow, StaleLookupError, UsedToken
from cds_service.store.hook_path import HookConnection

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def _unauthorized() -> ApiError:
    return ApiError(401, "", code=IssueType.LOGIN, headers={"WWW-Authenticate": "Bearer"})


def _replayed(verified: VerifiedToken) -> ApiError:
    log.warning(
        "cds auth refused",
        extra={
            "reason": "replayed jti",
            "iss": verified.iss,
            "tenant": verified.tenant,
            "jti": verified.jti,
        },
    )
    return _unauthorized()


def authenticate(*, record_jti: bool = True) -> VerifiedToken | None:
    """Verify the bearer JWT of the current request; None when auth is off (development).

    ``record_jti=False``: the caller must record the jti (``commit_call``) before acting.
    """
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
    if record_jti and not st.store.use_jti(
        verified.iss, verified.jti, verified.exp, st.settings.cds_jwt_leeway_seconds
    ):
        raise _replayed(verified)
    log.debug(
        "cds auth ok", extra={"iss": verified.iss, "tenant": verified.tenant, "jti": verified.jti}
    )
    return verified


def call_connection() -> HookConnection | None:
    """The deferred call's pooled connection (checked out on first use, closed by the wrapper)."""
    if "cds_conn_open" not in g:
        return None
    conn: HookConnection | None = g.get("cds_conn")
    if conn is None:
        conn = g.cds_conn = state().store.hook_connection()
    return conn


def lookup_rows(keys: Iterable[tuple[str, str]]) -> list[HookRow]:
    """The deferred call's hook lookup: reused from this process when its generation is current.

    Reused only when the call will record a jti (``commit_call`` checks the generation there);
    every lookup made is kept for the next call of the same patient.
    """
    st = state()
    key = tuple(keys)
    if g.get("cds_jti_pending") and not g.get("cds_fresh_lookup"):
        kept = st.lookups.get(key)
        if kept is not None:
            g.cds_generation = kept.generation
            return kept.rows
    found = st.store.hook_rows(key, call_connection(), generation=st.lookups.capacity > 0)
    st.lookups.put(key, found)
    return found.rows


def commit_call(events: Sequence[AuditTuple]) -> None:
    """Record the call's pending jti and its audit events atomically; 401 on a replay.

    ``StaleLookupError`` (nothing written) when the call answered from a reused lookup that a
    change has since outdated: ``jwt_required_deferred`` then runs the view again.
    """
    st = state()
    verified: VerifiedToken | None = g.get("cds_token")
    used = None
    if g.get("cds_jti_pending") and verified is not None:
        leeway = st.settings.cds_jwt_leeway_seconds
        used = UsedToken.of(verified.iss, verified.jti, verified.exp, leeway)
    generation: int | None = g.pop("cds_generation", None)
    recorded = st.store.record_call(used, events, call_connection(), generation)
    g.cds_jti_pending = False
    if not recorded:
        assert verified is not None
        raise _replayed(verified)


def _settle() -> None:
    if g.get("cds_jti_pending"):
        commit_call(())


def jwt_required(view: Callable[P, R]) -> Callable[P, R]:
    """Decorator: refuse the call with a bare 401 unless the JWT verifies and is not replayed."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.cds_token = authenticate()
        return view(*args, **kwargs)

    return wrapper


def jwt_required_deferred(view: Callable[P, R]) -> Callable[P, R]:
    """Like ``jwt_required``, but the jti is recorded by the view's ``commit_call``.

    Whatever the view does (answer, error), the jti is recorded before the response leaves, so a
    token is used once; a replay gets the bare 401 instead of the view's answer.
    """

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.cds_token = authenticate(record_jti=False)
        g.cds_conn_open = True
        try:
            for fresh in (False, True):
                g.cds_jti_pending = g.cds_token is not None
                g.cds_fresh_lookup = fresh
                g.pop("cds_generation", None)
                try:
                    try:
                        result = view(*args, **kwargs)
                    except StaleLookupError:
                        raise
                    except Exception:
                        _settle()  # a replay's 401 replaces the view's error
                        raise
                    _settle()
                    return result
                except StaleLookupError:
                    continue  # nothing was recorded: answer from a fresh lookup
            raise AssertionError("a fresh lookup cannot be stale")
        finally:
            conn: HookConnection | None = g.pop("cds_conn", None)
            g.pop("cds_conn_open", None)
            if conn is not None:
                conn.close()  # back to the pool (an uncommitted read is rolled back)

    return wrapper
