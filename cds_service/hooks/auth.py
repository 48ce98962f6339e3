"""The JWT gate of the CDS Hooks endpoints (discovery, service, feedback).

``aud`` is rebuilt from the configured public base URL plus the request path, so a token minted
for one endpoint cannot be used on another, also behind a proxy (CDS Hooks 2.0.1 §Trusting).

Every call's signature and claims are verified before the view runs. The ``jti`` replay record
is kept in the database (shared by workers and instances). ``jwt_required`` records it before the
view; ``jwt_required_deferred`` (the read-only hook call) records it together with the call's
audit events in one transaction through ``DeferredCall.commit`` — before any card leaves and
before any other write — which saves a commit per call without letting a replay through. The
deferred call also runs its lookup on the same pooled connection (``DeferredCall.connection``), so
a call checks out one connection; on PostgreSQL that connection is in autocommit and the jti +
audit write is one statement (``Store.hook_connection``).

A deferred call may answer from this process's earlier lookup of the same patient
(``DeferredCall.lookup_rows``, ``store.lookup_cache``); its ``commit`` then records the jti only
if the database's hook generation is still that lookup's. If it is not, nothing was written and the
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
from cds_service.state import ServiceState, state
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


def authenticate(st: ServiceState, *, record_jti: bool = True) -> VerifiedToken | None:
    """Verify the bearer JWT of the current request; None when auth is off (development).

    ``record_jti=False``: the caller must record the jti (``DeferredCall.commit``) before acting.
    """
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


class DeferredCall:
    """One deferred hook call: its verified token, its pooled connection, its pending jti.

    Kept as ``g.cds_call`` by ``jwt_required_deferred``; the view hands :meth:`lookup_rows` and
    :meth:`commit` to the hook handler. One object instead of a handful of ``g`` keys: every
    ``g`` access is a context-local look-up, and the call path makes dozens.
    """

    def __init__(self, st: ServiceState, token: VerifiedToken | None) -> None:
        self.st = st
        self.token = token
        self.jti_pending = False
        self.fresh_lookup = False  # True: the rerun after a stale reused lookup
        self.generation: int | None = None  # the reused lookup's, checked by ``commit``
        self._conn: HookConnection | None = None

    def connection(self) -> HookConnection:
        """The call's pooled connection, checked out on first use (closed by ``close``)."""
        if self._conn is None:
            self._conn = self.st.store.hook_connection()
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # back to the pool (an uncommitted read is rolled back)

    def attempt(self, fresh: bool) -> None:
        """Start the view's (first or fresh) run: the jti is pending again, no reused lookup."""
        self.jti_pending = self.token is not None
        self.fresh_lookup = fresh
        self.generation = None

    def lookup_rows(self, keys: Iterable[tuple[str, str]]) -> list[HookRow]:
        """The call's hook lookup: reused from this process when its generation is current.

        Reused only when the call will record a jti (``commit`` checks the generation there);
        every lookup made is kept for the next call of the same patient.
        """
        st = self.st
        key = tuple(keys)
        if self.jti_pending and not self.fresh_lookup:
            kept = st.lookups.get(key)
            if kept is not None:
                self.generation = kept.generation
                return kept.rows
        found = st.store.hook_rows(key, self.connection(), generation=st.lookups.capacity > 0)
        st.lookups.put(key, found)
        return found.rows

    def commit(self, events: Sequence[AuditTuple]) -> None:
        """Record the call's pending jti and its audit events atomically; 401 on a replay.

        ``StaleLookupError`` (nothing written) when the call answered from a reused lookup that
        a change has since outdated: ``jwt_required_deferred`` then runs the view again.
        """
        verified = self.token
        used = None
        if self.jti_pending and verified is not None:
            leeway = self.st.settings.cds_jwt_leeway_seconds
            used = UsedToken.of(verified.iss, verified.jti, verified.exp, leeway)
        generation, self.generation = self.generation, None
        recorded = self.st.store.record_call(used, events, self.connection(), generation)
        self.jti_pending = False
        if not recorded:
            assert verified is not None
            raise _replayed(verified)

    def settle(self) -> None:
        """Record a jti the view left pending (it answered without ``commit``)."""
        if self.jti_pending:
            self.commit(())


def deferred_call() -> DeferredCall:
    """The current request's :class:`DeferredCall` (inside a ``jwt_required_deferred`` view)."""
    call: DeferredCall = g.cds_call
    return call


def jwt_required(view: Callable[P, R]) -> Callable[P, R]:
    """Decorator: refuse the call with a bare 401 unless the JWT verifies and is not replayed."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        g.cds_token = authenticate(state())
        return view(*args, **kwargs)

    return wrapper


def jwt_required_deferred(view: Callable[P, R]) -> Callable[P, R]:
    """Like ``jwt_required``, but the jti is recorded by the view's ``DeferredCall.commit``.

    Whatever the view does (answer, error), the jti is recorded before the response leaves, so a
    token is used once; a replay gets the bare 401 instead of the view's answer.
    """

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        st = state()
        token = g.cds_token = authenticate(st, record_jti=False)
        call = g.cds_call = DeferredCall(st, token)
        try:
            for fresh in (False, True):
                call.attempt(fresh)
                try:
                    try:
                        result = view(*args, **kwargs)
                    except StaleLookupError:
                        raise
                    except Exception:
                        call.settle()  # a replay's 401 replaces the view's error
                        raise
                    call.settle()
                    return result
                except StaleLookupError:
                    continue  # nothing was recorded: answer from a fresh lookup
            raise AssertionError("a fresh lookup cannot be stale")
        finally:
            call.close()

    return wrapper
