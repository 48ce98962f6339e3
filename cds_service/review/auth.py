"""Sign-in, roles, CSRF, host allow-list and secure headers of the review app.

:func:`install` hangs everything on the review blueprint, so an app that registers the blueprint
gets all of it and the CDS Hooks / results endpoints (JWT, bearer token) get none of it:

- every request to a review page: the ``Host`` header must be an allowed name (400 otherwise:
  a DNS-rebinding page gets no answer), the session cookie is resolved to a user in the database;
- every POST: a cross-site ``Origin`` is refused (403) and a valid Flask-WTF CSRF token is
  required (400) — also for a POST without ``Origin``, and also for the sign-in form;
- every response: a CSP without inline script, ``frame-ancestors 'none'``, ``nosniff``, a
  same-origin referrer and ``no-store`` (pages show patient data);
- views say who may use them with :func:`login_required` / :func:`role_required`; who did what
  is :func:`current_user`, never a form field.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect
from werkzeug.sansio.utils import host_is_trusted
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service.accounts import (
    PERMISSIONS,
    Accounts,
    Permission,
    Role,
    SessionPolicy,
    SignedIn,
    SignInRefused,
)
from cds_service.audit import AuditAction
from cds_service.state import EXTENSION_KEY, ServiceState, state
from her2low.core.database import session_factory
from her2low.core.settings import Settings

log = logging.getLogger(__name__)

EXTENSION = "her2low_review"
SESSION_COOKIE = "her2low_review_session"
COOKIE_PATH = "/review"
LOOPBACK = ("127.0.0.1", "localhost")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)

#: Review endpoints open without a sign-in (everything else redirects to the sign-in form).
PUBLIC_ENDPOINTS = frozenset({"review.static", "review.auth.sign_in", "review.auth.sign_out"})

P = ParamSpec("P")
R = TypeVar("R")

bp = Blueprint("auth", __name__)


@dataclass
class ReviewSecurity:
    """Per-app state of the review app's security (``app.extensions[EXTENSION]``)."""

    accounts: Accounts
    allowed_hosts: tuple[str, ...]
    https: bool  # cds_public_base_url is https: cookies are Secure even behind a TLS proxy
    csrf: CSRFProtect


def security() -> ReviewSecurity:
    value = current_app.extensions[EXTENSION]
    assert isinstance(value, ReviewSecurity)
    return value


def current_user() -> SignedIn | None:
    """The signed-in user of this request (resolved once per request by the guard)."""
    user = g.get("review_user")
    return user if isinstance(user, SignedIn) else None


def signed_in_user() -> SignedIn:
    """The user of a view behind :func:`login_required` (never None there)."""
    user = current_user()
    if user is None:
        abort(401, "sign in first")
    return user


# --- decorators ---------------------------------------------------------------------------------


def login_required(view: Callable[P, R]) -> Callable[P, R | WerkzeugResponse]:
    """Anonymous GET → redirect to the sign-in page (back here after); other methods → 401."""

    @functools.wraps(view)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R | WerkzeugResponse:
        if current_user() is None:
            if request.method in ("GET", "HEAD"):
                return redirect(url_for("review.auth.sign_in", next=request.path), code=303)
            abort(401, "sign in first")
        return view(*args, **kwargs)

    return wrapped


def role_required(*roles: Role) -> Callable[[Callable[P, R]], Callable[P, R | WerkzeugResponse]]:
    """Signed in with one of ``roles`` (403 otherwise)."""
    allowed = frozenset(roles)

    def decorate(view: Callable[P, R]) -> Callable[P, R | WerkzeugResponse]:
        @functools.wraps(view)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            user = signed_in_user()
            if user.role not in allowed:
                abort(403, f"a {user.role.display.lower()} may not do this")
            return view(*args, **kwargs)

        return login_required(checked)

    return decorate


def permission_required(
    permission: Permission,
) -> Callable[[Callable[P, R]], Callable[P, R | WerkzeugResponse]]:
    """:func:`role_required` for the roles :data:`~cds_service.accounts.PERMISSIONS` grant."""
    return role_required(*(role for role, granted in PERMISSIONS.items() if permission in granted))


# --- installation ---------------------------------------------------------------------------------


def install(parent: Blueprint) -> None:
    """Put sign-in, CSRF, host check and headers on ``parent`` (the review blueprint)."""
    parent.record_once(_setup)
    parent.before_request(_guard)
    parent.after_request(_headers)
    parent.app_context_processor(_template_globals)
    parent.register_blueprint(bp)


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie (it holds only the CSRF secret), Secure when served over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request and (request.is_secure or security().https))


def secret_key(settings: Settings) -> str:
    """``review_secret_key``, or one generated once into home/secrets (0600), shared by workers."""
    if settings.review_secret_key:
        return settings.review_secret_key
    path: Path = settings.home / "secrets" / "review-secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker won the race
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(32).hex())
    for _ in range(50):  # the winner may not have written yet
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty")


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The public base URL's host, the configured aliases, and loopback names in development."""
    public = urlsplit(settings.cds_public_base_url).hostname or "localhost"
    hosts = [public, *(h.strip().lower() for h in settings.review_allowed_hosts if h.strip())]
    if public in LOOPBACK:
        hosts += [h for h in LOOPBACK if h not in hosts]
    return tuple(hosts)


def _policy(settings: Settings) -> SessionPolicy:
    return SessionPolicy(
        idle=timedelta(minutes=settings.review_session_idle_minutes),
        absolute=timedelta(hours=settings.review_session_max_hours),
        max_failures=settings.review_signin_max_failures,
        max_failures_per_address=settings.review_signin_max_failures_per_address,
        lockout=timedelta(minutes=settings.review_signin_lockout_minutes),
    )


def _setup(setup: BlueprintSetupState) -> None:
    app = setup.app
    assert isinstance(app, Flask)
    service = app.extensions[EXTENSION_KEY]
    assert isinstance(service, ServiceState)
    settings = service.settings
    policy = _policy(settings)
    if not app.secret_key:
        app.secret_key = secret_key(settings)
    app.config.update(
        WTF_CSRF_CHECK_DEFAULT=False,  # only the review blueprint's forms (hooks use JWTs)
        WTF_CSRF_TIME_LIMIT=int(policy.absolute.total_seconds()),
        SESSION_COOKIE_NAME="her2low_review_csrf",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH=COOKIE_PATH,
    )
    app.session_interface = _SessionInterface()
    csrf = CSRFProtect(app)
    app.extensions[EXTENSION] = ReviewSecurity(
        accounts=Accounts(session_factory(service.engine), policy),
        allowed_hosts=allowed_hosts(settings),
        https=settings.cds_public_base_url.lower().startswith("https:"),
        csrf=csrf,
    )


def _same_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc == request.host


def _guard() -> WerkzeugResponse | None:
    sec = security()
    if not host_is_trusted(request.host, sec.allowed_hosts):
        abort(400, "unknown host name: the review app answers only to its configured names")
    if request.endpoint == "review.static":
        return None
    token = request.cookies.get(SESSION_COOKIE, "")
    g.review_user = sec.accounts.session_user(token) if token else None
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin):
            abort(403, "cross-site form post refused")
        sec.csrf.protect()  # 400 without a valid token, whatever the Origin says
    if g.review_user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        # every review view needs a sign-in, also one added without @login_required
        if request.method in ("GET", "HEAD"):
            return redirect(url_for("review.auth.sign_in", next=request.path), code=303)
        abort(401, "sign in first")
    return None


def _headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if request.endpoint != "review.static":
        headers["Cache-Control"] = "no-store"
        headers["Pragma"] = "no-cache"
    if security().https or request.is_secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    return response


def _template_globals() -> dict[str, Any]:
    user = current_user()

    def can(permission: str) -> bool:
        return user is not None and user.can(Permission(permission))

    return {"review_user": user, "can": can}


def _client() -> str:
    return (request.remote_addr or "unknown")[:64]


def _safe_next(target: str | None) -> str:
    """Only a path inside the review app (no open redirect to another site)."""
    # "//" and a backslash (read as a slash by browsers) could leave the site
    if (
        target
        and target.startswith(COOKIE_PATH + "/")
        and "//" not in target
        and "\\" not in target
    ):
        return target
    return url_for("review.worklist")


# --- views ------------------------------------------------------------------------------------------


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> WerkzeugResponse | tuple[str, int]:
    """The sign-in form (fields ``username`` and ``password``)."""
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user() is not None:
            return redirect(target, code=303)
        return render_template(
            "review_sign_in.html", next=target, error=None, username="", reference=True
        ), 200
    username = (request.form.get("username") or "").strip()
    password = request.form.get("password") or ""
    accounts = security().accounts
    try:
        user = accounts.authenticate(username, password, _client())
    except SignInRefused as exc:
        state().store.audit(
            "anonymous",
            AuditAction.SIGN_IN_REFUSED,
            None,
            {"username": username.lower()[:64], "locked": exc.locked},
        )
        html = render_template(
            "review_sign_in.html",
            next=target,
            error=str(exc),
            username=username[:64],
            reference=True,
        )
        return html, 429 if exc.locked else 401
    previous = request.cookies.get(SESSION_COOKIE, "")
    if previous:
        accounts.revoke(previous)  # one browser, one live session
    token = accounts.open_session(user, _client())
    state().store.audit(user.username, AuditAction.SIGNED_IN, None, {"role": user.role.value})
    session.pop("csrf_token", None)  # a fresh CSRF secret for the signed-in session
    response = redirect(target, code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(accounts.policy.absolute.total_seconds()),
        path=COOKIE_PATH,
        secure=request.is_secure or security().https,
        httponly=True,
        samesite="Lax",
    )
    return response


@bp.post("/sign-out")
def sign_out() -> WerkzeugResponse:
    """End this session (the row is revoked, so a copied cookie stops working too)."""
    token = request.cookies.get(SESSION_COOKIE, "")
    user = current_user()
    if token:
        security().accounts.revoke(token)
    if user is not None:
        state().store.audit(user.username, AuditAction.SIGNED_OUT, None)
    session.clear()
    response = redirect(url_for("review.auth.sign_in"), code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


@bp.get("/admin/users")
@permission_required(Permission.MANAGE_USERS)
def users() -> str:
    """Accounts and their roles (changes: ``her2low user …``)."""
    return render_template(
        "review_users.html", users=security().accounts.users(), roles=Role, reference=True
    )


@bp.get("/admin/audit")
@permission_required(Permission.READ_AUDIT)
def audit() -> tuple[str, int]:
    """Audit events, newest first, filtered by actor, action, date range and case; CSV export."""
    from cds_service.review.audit_export import PAGE_LIMIT, describe, parse_query

    query, errors = parse_query(request.args)
    store = state().store
    events = [] if errors else store.audit_events(query, limit=PAGE_LIMIT)
    store.audit(signed_in_user().username, AuditAction.AUDIT_VIEWED, None, describe(query) or None)
    html = render_template(
        "review_audit.html",
        events=events,
        limit=PAGE_LIMIT,
        errors=errors,
        filters=request.args,
        actors=store.audit_actors(),
        actions=list(AuditAction),
        csv_url=url_for("review.audit_csv")
        + (f"?{urlencode(request.args)}" if request.args else ""),
        reference=True,
    )
    return html, 400 if errors else 200
