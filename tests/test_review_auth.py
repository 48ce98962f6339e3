"""Review-app identity and safety (issue 13): sign-in, sessions, throttling, roles, CSRF, Host
allow-list, secure headers, the audit's actor, and the ``her2low user`` commands.

Flask's test client against a fresh migrated database per test; the real-browser checks are in
``test_review_browser.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from test_cds_support import (
    RESULTS_TOKEN,
    FakePredictor,
    csrf_token,
    result_payload,
)

from cds_service.accounts import (
    PERMISSIONS,
    AccountError,
    Accounts,
    Permission,
    Role,
    ensure_demo_users,
    read_demo_users,
)
from cds_service.app import AppPart, create_app
from cds_service.db import MIGRATIONS
from cds_service.orm import AuditEvent, utcnow
from her2low.core.ports import free_port, wait_port
from her2low.core.settings import Settings

PASSWORD = "correct horse battery staple"
TEMPLATES = Path(__file__).resolve().parents[1] / "cds_service" / "review" / "templates"


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path,
        "cds_db_url": f"sqlite:///{tmp_path / 'cds.db'}",
        "cds_public_base_url": "http://127.0.0.1:8080",
        "results_api_token": RESULTS_TOKEN,
        "cds_patient_id_systems": {"HOSP": "urn:oid:1.2.3.4.5"},
        "review_signin_max_failures": 3,
        "review_signin_max_failures_per_address": 6,
    }
    values.update(overrides)
    return Settings(**values)


def _app(tmp_path: Path, **overrides: Any) -> Flask:
    settings = _settings(tmp_path, **overrides)
    MIGRATIONS.upgrade(settings.cds_database_url)
    return create_app(settings, runtime=FakePredictor())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    flask_app = _app(tmp_path)
    yield flask_app
    flask_app.extensions["her2low_cds"].engine.dispose()


def accounts_of(app: Flask) -> Accounts:
    value = app.extensions["her2low_review"].accounts
    assert isinstance(value, Accounts)
    return value


def publish(app: Flask) -> str:
    response = app.test_client().post(
        "/api/v1/results",
        json=result_payload(),
        headers={"Authorization": f"Bearer {RESULTS_TOKEN}"},
    )
    assert response.status_code == 201, response.text
    return str(response.json["result_id"])  # type: ignore[index]


def sign_in(client: FlaskClient, username: str, password: str = PASSWORD, **environ: Any) -> Any:
    page = client.get("/review/sign-in", **environ)
    return client.post(
        "/review/sign-in",
        data={"username": username, "password": password, "csrf_token": csrf_token(page.text)},
        **environ,
    )


def signed_in(app: Flask, role: Role, username: str = "") -> FlaskClient:
    name = username or f"dr-{role.value}"
    if accounts_of(app).user(name) is None:
        accounts_of(app).add_user(name, role, PASSWORD)
    client = app.test_client()
    assert sign_in(client, name).status_code == 303
    return client


def token_of(client: FlaskClient) -> str:
    return csrf_token(client.get("/review/").text)


def decide(client: FlaskClient, rid: str, **extra: str) -> Any:
    form = {"decision": "amend", "reason": "descriptors-corrected", "csrf_token": token_of(client)}
    form.update(extra)
    return client.post(f"/review/cases/{rid}/decision", data=form)


DESCRIPTORS = {
    "lesion_type": "mass",
    "mass_shape": "irregular",
    "mass_margin": "spiculated",
    "mass_internal_enhancement": "heterogeneous",
    "t2_hyperintensity": "no",
    "peritumoral_edema": "yes",
}


def enter_descriptors(client: FlaskClient, rid: str, **extra: str) -> Any:
    form = {**DESCRIPTORS, "csrf_token": token_of(client), **extra}
    return client.post(f"/review/cases/{rid}/descriptors", data=form)


def actions(app: Flask, rid: str | None = None) -> list[tuple[str, str]]:
    with accounts_of(app).sessions() as s:
        rows = s.query(AuditEvent).order_by(AuditEvent.id).all()
    return [(a.actor, a.action) for a in rows if rid is None or a.result_id == rid]


# --- anonymous --------------------------------------------------------------------------------


def test_anonymous_review_pages_redirect_to_sign_in(app: Flask) -> None:
    rid = publish(app)
    client = app.test_client()
    for path in ("/review/", f"/review/cases/{rid}", "/review/model-card", "/review/admin/audit"):
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["Location"].startswith("/review/sign-in?next=/review/"), path
    page = client.get("/review/sign-in")
    assert page.status_code == 200
    assert 'name="username"' in page.text and 'name="password"' in page.text
    assert "MRN-1" not in client.get(f"/review/cases/{rid}").text
    # machine endpoints keep their own authentication and never redirect to a sign-in form
    assert client.get("/healthz").status_code == 200
    assert client.get("/cds-services").status_code == 401
    assert client.get(f"/api/v1/cases/{rid}").status_code == 401


def test_every_review_route_needs_a_sign_in(app: Flask) -> None:
    """Also routes added later without @login_required: the blueprint's guard enforces it."""
    from cds_service.review.auth import PUBLIC_ENDPOINTS

    client = app.test_client()
    rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/review")]
    assert len(rules) >= 6
    for rule in rules:
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "x").replace(f"<path:{arg}>", "x")
        path = re.sub(r"<[^>]+>", "1", path)
        for method in sorted((rule.methods or set()) - {"OPTIONS", "HEAD"}):
            response = client.open(path, method=method)
            if method == "GET":
                assert response.status_code == 303, (method, path)
                assert "/review/sign-in" in response.headers["Location"]
            else:
                assert response.status_code in (400, 401), (method, path)


def test_anonymous_post_decision_refused(app: Flask) -> None:
    rid = publish(app)
    client = app.test_client()
    form = {"decision": "entered-in-error", "reason": "wrong-lesion"}
    assert client.post(f"/review/cases/{rid}/decision", data=form).status_code == 400
    # even with a valid CSRF token (taken from the sign-in page) an anonymous POST is refused
    form["csrf_token"] = csrf_token(client.get("/review/sign-in").text)
    assert client.post(f"/review/cases/{rid}/decision", data=form).status_code == 401
    case = app.extensions["her2low_cds"].store.case(rid)
    assert case.result.observation_override is None
    assert not [a for _, a in actions(app, rid) if a.startswith("board-")]


# --- sign-in, throttling, sessions ---------------------------------------------------------------


def test_sign_in_and_wrong_password(app: Flask) -> None:
    accounts_of(app).add_user("dr-onc", Role.ONCOLOGIST, PASSWORD)
    client = app.test_client()
    wrong = sign_in(client, "dr-onc", "not the password at all")
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    assert "her2low_review_session" not in wrong.headers.get("Set-Cookie", "")
    assert client.get("/review/").status_code == 303
    unknown = sign_in(client, "nobody", PASSWORD)
    assert unknown.status_code == 401 and "Wrong user name or password" in unknown.text
    ok = sign_in(client, "dr-onc")
    assert ok.status_code == 303 and ok.headers["Location"] == "/review/"
    page = client.get("/review/")
    assert page.status_code == 200 and "Signed in as" in page.text and "dr-onc" in page.text
    assert ("anonymous", "sign-in-refused") in actions(app)
    assert ("dr-onc", "signed-in") in actions(app)
    # the stored hash is argon2id, never the password
    (user,) = accounts_of(app).users()
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(app: Flask) -> None:
    rid = publish(app)
    accounts_of(app).add_user("dr-onc", Role.ONCOLOGIST, PASSWORD)
    client = app.test_client()
    asked = client.get(f"/review/cases/{rid}").headers["Location"]
    token = csrf_token(client.get(asked).text)
    data = {"username": "dr-onc", "password": PASSWORD, "csrf_token": token}
    back = client.post("/review/sign-in", data={**data, "next": f"/review/cases/{rid}"})
    assert back.headers["Location"] == f"/review/cases/{rid}"
    for evil in ("https://evil.example.test/", "//evil.example.test/", "/review/\\\\evil"):
        other = app.test_client()
        token = csrf_token(other.get("/review/sign-in").text)
        response = other.post("/review/sign-in", data={**data, "csrf_token": token, "next": evil})
        assert response.headers["Location"] == "/review/", evil


def test_throttling_locks_the_user_name_then_the_address(app: Flask) -> None:
    accounts_of(app).add_user("dr-rad", Role.RADIOLOGIST, PASSWORD)
    client = app.test_client()
    for _ in range(3):  # review_signin_max_failures=3
        assert sign_in(client, "dr-rad", "wrong password here").status_code == 401
    locked = sign_in(client, "dr-rad")  # the right password no longer helps
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
    # another user name from another address is not affected
    accounts_of(app).add_user("dr-onc", Role.ONCOLOGIST, PASSWORD)
    elsewhere = app.test_client()
    assert sign_in(elsewhere, "dr-onc", environ_base={"REMOTE_ADDR": "10.0.0.9"}).status_code == 303
    # per address (max 6): spraying many user names from one address locks the address
    sprayer = app.test_client()
    env = {"REMOTE_ADDR": "10.6.6.6"}
    for k in range(6):
        response = sign_in(sprayer, f"guess{k}", "wrong password here", environ_base=env)
        assert response.status_code == 401
    assert sign_in(sprayer, "dr-onc", environ_base=env).status_code == 429
    # the lock ends after review_signin_lockout_minutes
    accounts = accounts_of(app)
    accounts.clock = lambda: utcnow() + timedelta(minutes=16)
    assert sign_in(client, "dr-rad").status_code == 303


def test_session_idle_and_absolute_expiry(app: Flask) -> None:
    client = signed_in(app, Role.ONCOLOGIST)
    accounts = accounts_of(app)
    assert client.get("/review/").status_code == 200
    accounts.clock = lambda: utcnow() + timedelta(minutes=31)  # idle limit 30 min
    assert client.get("/review/").status_code == 303
    accounts.clock = utcnow
    client = signed_in(app, Role.ONCOLOGIST)
    start = utcnow()
    for minutes in range(20, 12 * 60, 20):  # active every 20 minutes ...
        accounts.clock = lambda m=minutes: start + timedelta(minutes=m)  # type: ignore[misc]
        assert client.get("/review/").status_code == 200, minutes
    accounts.clock = lambda: start + timedelta(hours=12, minutes=1)  # ... still ends at 12 h
    assert client.get("/review/").status_code == 303


def test_sign_out_disable_and_reset_revoke_sessions(app: Flask) -> None:
    client = signed_in(app, Role.RADIOLOGIST)
    cookie = client.get_cookie("her2low_review_session", path="/review")
    assert cookie is not None
    stolen = app.test_client()
    stolen.set_cookie("her2low_review_session", cookie.value, path="/review")
    assert stolen.get("/review/").status_code == 200
    assert client.post("/review/sign-out", data={"csrf_token": token_of(client)}).status_code == 303
    assert client.get("/review/").status_code == 303
    assert stolen.get("/review/").status_code == 303  # the row is revoked, not just the cookie

    accounts = accounts_of(app)
    first = signed_in(app, Role.RADIOLOGIST)
    accounts.set_active("dr-radiologist", False)
    assert first.get("/review/").status_code == 303
    assert sign_in(app.test_client(), "dr-radiologist").status_code == 401
    accounts.set_active("dr-radiologist", True)
    second = signed_in(app, Role.RADIOLOGIST)
    accounts.reset_password("dr-radiologist", "another long password")
    assert second.get("/review/").status_code == 303
    assert sign_in(app.test_client(), "dr-radiologist").status_code == 401
    assert sign_in(app.test_client(), "dr-radiologist", "another long password").status_code == 303


def test_account_rules() -> None:
    from cds_service.accounts import check_password, check_username

    with pytest.raises(AccountError):
        check_password("short")
    with pytest.raises(AccountError):
        check_username("Robert'); DROP")
    assert check_username(" Dr.Smith ") == "dr.smith"


# --- roles --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "descriptors", "decision"),
    [
        (Role.RADIOLOGIST, 303, 303),
        (Role.ONCOLOGIST, 403, 303),
        (Role.PATHOLOGIST, 403, 403),
        (Role.COORDINATOR, 403, 403),
        (Role.ADMIN, 403, 403),
    ],
)
def test_role_enforcement(app: Flask, role: Role, descriptors: int, decision: int) -> None:
    rid = publish(app)
    client = signed_in(app, role)
    assert client.get(f"/review/cases/{rid}").status_code == 200  # every role reads
    assert enter_descriptors(client, rid).status_code == descriptors
    assert decide(client, rid).status_code == decision
    page = client.get(f"/review/cases/{rid}").text
    assert ('name="lesion_type"' in page) is (descriptors == 303)  # no form it may not use
    assert ('name="decision"' in page) is (decision == 303)
    admin_pages = 200 if role is Role.ADMIN else 403
    assert client.get("/review/admin/users").status_code == admin_pages
    assert client.get("/review/admin/audit").status_code == admin_pages


def test_permissions_table_matches_the_issue() -> None:
    def who(p: Permission) -> set[Role]:
        return {r for r, granted in PERMISSIONS.items() if p in granted}

    assert who(Permission.ENTER_DESCRIPTORS) == {Role.RADIOLOGIST}
    assert who(Permission.RECORD_DECISION) == {Role.RADIOLOGIST, Role.ONCOLOGIST}
    assert who(Permission.ENTER_PATHOLOGY) == {Role.PATHOLOGIST}
    assert who(Permission.MANAGE_USERS) == who(Permission.READ_AUDIT) == {Role.ADMIN}


def test_audit_names_the_session_user_not_a_form_field(app: Flask) -> None:
    rid = publish(app)
    radiologist = signed_in(app, Role.RADIOLOGIST, "dr-rad")
    response = enter_descriptors(radiologist, rid, entered_by="dr-forged", roi_confirmed="yes")
    assert response.status_code == 303
    oncologist = signed_in(app, Role.ONCOLOGIST, "dr-onc")
    assert decide(oncologist, rid, reviewer="dr-forged").status_code == 303
    trail = actions(app, rid)
    assert ("dr-rad", "descriptors-entered") in trail
    assert ("dr-onc", "board-amend") in trail
    assert all(actor != "dr-forged" for actor, _ in trail)
    page = oncologist.get(f"/review/cases/{rid}").text
    assert "entered by dr-rad" in page and "dr-onc board-amend" in page
    assert ("dr-onc", "case-viewed") in actions(app, rid)
    assert 'name="entered_by"' not in page and 'name="reviewer"' not in page
    admin = signed_in(app, Role.ADMIN)
    audit = admin.get("/review/admin/audit").text
    assert "dr-onc" in audit and "board-amend" in audit and "signed-in" in audit


# --- CSRF, Host, headers, cookies ------------------------------------------------------------------


def test_csrf_token_required(app: Flask) -> None:
    rid = publish(app)
    client = signed_in(app, Role.ONCOLOGIST)
    url = f"/review/cases/{rid}/decision"
    form = {"decision": "amend", "reason": "other"}
    missing = client.post(url, data=form)
    assert missing.status_code == 400 and "CSRF" in missing.text
    assert client.post(url, data={**form, "csrf_token": "forged"}).status_code == 400
    # another browser's token does not fit this session
    other = signed_in(app, Role.ONCOLOGIST, "dr-other")
    assert client.post(url, data={**form, "csrf_token": token_of(other)}).status_code == 400
    # sign-in and sign-out need the token too (login CSRF)
    anonymous = app.test_client()
    data = {"username": "dr-oncologist", "password": PASSWORD}
    assert anonymous.post("/review/sign-in", data=data).status_code == 400
    assert client.post("/review/sign-out").status_code == 400
    # defence in depth: a foreign Origin is refused even with a valid token
    token = token_of(client)
    cross = client.post(
        url, data={**form, "csrf_token": token}, headers={"Origin": "https://evil.example.test"}
    )
    assert cross.status_code == 403
    assert client.post(url, data={**form, "csrf_token": token}).status_code == 303


def test_foreign_host_refused(tmp_path: Path) -> None:
    app = _app(
        tmp_path,
        cds_public_base_url="https://her2low.example.org",
        review_allowed_hosts=["review.example.org"],
    )
    try:
        client = app.test_client()
        for host in ("her2low.example.org", "review.example.org", "her2low.example.org:8443"):
            response = client.get("/review/sign-in", headers={"Host": host})
            assert response.status_code == 200, host
        for host in ("evil.example.test", "127.0.0.1", "her2low.example.org.evil.test"):
            assert client.get("/review/sign-in", headers={"Host": host}).status_code == 400, host
            assert client.get("/review/", headers={"Host": host}).status_code == 400, host
    finally:
        app.extensions["her2low_cds"].engine.dispose()


def test_loopback_names_allowed_only_in_development(app: Flask) -> None:
    client = app.test_client()  # public base http://127.0.0.1:8080
    for host in ("127.0.0.1:8080", "localhost:5000"):
        assert client.get("/review/sign-in", headers={"Host": host}).status_code == 200
    assert client.get("/review/sign-in", headers={"Host": "attacker.test"}).status_code == 400


def test_security_headers_and_cookie_flags(app: Flask) -> None:
    rid = publish(app)
    client = app.test_client()
    page = client.get("/review/sign-in")
    csrf_cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in csrf_cookie and "SameSite=Lax" in csrf_cookie
    assert "Secure" not in csrf_cookie  # plain HTTP on loopback in development
    accounts_of(app).add_user("dr-onc", Role.ONCOLOGIST, PASSWORD)
    signed = client.post(
        "/review/sign-in",
        data={"username": "dr-onc", "password": PASSWORD, "csrf_token": csrf_token(page.text)},
    )
    session_cookie = next(
        c for c in signed.headers.getlist("Set-Cookie") if c.startswith("her2low_review_session=")
    )
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie
    case = client.get(f"/review/cases/{rid}")
    assert case.status_code == 200
    csp = case.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert case.headers["X-Content-Type-Options"] == "nosniff"
    assert case.headers["Referrer-Policy"] == "same-origin"
    assert case.headers["Cache-Control"] == "no-store"
    assert client.get("/review/sign-in").headers["Cache-Control"] == "no-store"
    # a foreign Host's refusal is a review response too: headers present
    assert "Content-Security-Policy" in client.get("/review/", headers={"Host": "x.test"}).headers


def test_cookies_secure_over_https(tmp_path: Path) -> None:
    app = _app(tmp_path, cds_public_base_url="https://her2low.example.org")
    try:
        accounts_of(app).add_user("dr-onc", Role.ONCOLOGIST, PASSWORD)
        client = app.test_client()
        https = {"base_url": "https://her2low.example.org"}
        page = client.get("/review/sign-in", **https)
        assert "Secure" in page.headers["Set-Cookie"]
        signed = client.post(
            "/review/sign-in",
            data={"username": "dr-onc", "password": PASSWORD, "csrf_token": csrf_token(page.text)},
            headers={"Referer": "https://her2low.example.org/review/sign-in"},
            **https,
        )
        assert signed.status_code == 303, signed.text
        cookies = signed.headers.getlist("Set-Cookie")
        assert all("Secure" in c for c in cookies if c.startswith("her2low_review_session="))
        assert "Strict-Transport-Security" in signed.headers
    finally:
        app.extensions["her2low_cds"].engine.dispose()


def test_templates_have_no_inline_script_or_style() -> None:
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert "<style" not in text and " style=" not in text, template.name
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert "http://" not in text and "https://" not in text, template.name  # no CDN


# --- split ports ----------------------------------------------------------------------------------


def test_review_only_and_hooks_only_apps(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    MIGRATIONS.upgrade(settings.cds_database_url)
    hooks = create_app(settings, runtime=FakePredictor(), part=AppPart.HOOKS)
    review = create_app(settings, runtime=FakePredictor(), part=AppPart.REVIEW)
    try:
        assert hooks.test_client().get("/review/sign-in").status_code == 404
        assert hooks.test_client().get("/cds-services").status_code == 401
        assert review.test_client().get("/review/sign-in").status_code == 200
        assert review.test_client().get("/cds-services").status_code == 404
        assert review.test_client().post("/api/v1/results", json={}).status_code == 404
    finally:
        for flask_app in (hooks, review):
            flask_app.extensions["her2low_cds"].engine.dispose()


def test_wsgi_serves_each_part_on_its_port(tmp_path: Path) -> None:
    from cds_service.wsgi import PortDispatcher, review_split

    assert not review_split(_settings(tmp_path))
    assert review_split(_settings(tmp_path, review_port=8081))
    assert not review_split(_settings(tmp_path, cds_port=8081, review_port=8081))

    class Sock:
        def __init__(self, port: int) -> None:
            self.port = port

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    def wsgi(name: str) -> Any:
        def answer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("200 OK", [])
            return [name.encode()]

        return answer

    dispatch = PortDispatcher({8080: wsgi("hooks"), 8081: wsgi("review")})
    statuses: list[str] = []
    for port, expected in ((8080, b"hooks"), (8081, b"review"), (9999, b"no application")):
        body = b"".join(dispatch({"gunicorn.socket": Sock(port)}, lambda s, h: statuses.append(s)))
        assert body.startswith(expected)
    assert statuses[-1].startswith("421")


# --- CLI and demo users -----------------------------------------------------------------------------


def test_user_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from her2low.cli import main

    monkeypatch.setenv("HER2LOW_HOME", str(tmp_path))
    monkeypatch.delenv("HER2LOW_CDS_DB_URL", raising=False)
    assert main(["user", "list"]) == 3  # not migrated: says what to run
    MIGRATIONS.upgrade(f"sqlite:///{(tmp_path / 'cds.db').resolve()}")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["user", "add", "Dr.Who", "--role", "oncologist", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["user", "add", "dr.two", "--role", "admin", "--password-stdin"]) == 1
    assert "at least 12 characters" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["user", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["username"] == "dr.who" and row["role"] == "oncologist" and row["active"]
    assert main(["user", "disable", "dr.who"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new password\n"))
    assert main(["user", "reset-password", "dr.who", "--password-stdin"]) == 0
    assert main(["user", "disable", "nobody"]) == 1
    capsys.readouterr()
    assert main(["user", "list"]) == 0
    listing = capsys.readouterr().out
    assert "dr.who" in listing and "disabled" in listing
    assert PASSWORD not in listing and "a brand new password" not in listing
    with pytest.raises(SystemExit):  # no --password option exists
        main(["user", "add", "x1", "--role", "admin", "--password", PASSWORD])


def test_demo_users_one_per_role_kept_secret(app: Flask, tmp_path: Path) -> None:
    accounts = accounts_of(app)
    users = ensure_demo_users(accounts, tmp_path)
    assert set(users) == {r.value for r in Role}
    path = tmp_path / "secrets" / "demo-users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_demo_users(tmp_path) == users
    assert ensure_demo_users(accounts, tmp_path) == users  # idempotent: same passwords
    for role, info in users.items():
        client = app.test_client()
        assert sign_in(client, info["username"], info["password"]).status_code == 303, role
    accounts.reset_password("demo-admin", "changed by someone else")
    again = ensure_demo_users(accounts, tmp_path)
    assert again["admin"]["password"] != users["admin"]["password"]
    assert sign_in(app.test_client(), "demo-admin", again["admin"]["password"]).status_code == 303


@pytest.mark.integration
@pytest.mark.slow
def test_her2low_service_binds_the_review_port_apart(tmp_path: Path) -> None:
    """gunicorn serves hooks on cds_port and the review app on review_port, each only its own."""
    cds_port, review_port = free_port(), free_port()
    MIGRATIONS.upgrade(f"sqlite:///{(tmp_path / 'cds.db').resolve()}")
    env = {
        **os.environ,
        "HER2LOW_HOME": str(tmp_path),
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_REVIEW_PORT": str(review_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
    }
    env.pop("HER2LOW_CDS_DB_URL", None)
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115 - the child's
    child = subprocess.Popen(
        [sys.executable, "-m", "her2low", "service", "--workers", "1"],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        assert wait_port(cds_port, 90) and wait_port(review_port, 30), (
            tmp_path / "service.log"
        ).read_text()
        hooks, review = f"http://127.0.0.1:{cds_port}", f"http://127.0.0.1:{review_port}"
        assert requests.get(hooks + "/cds-services", timeout=10).status_code == 401
        assert requests.get(hooks + "/review/sign-in", timeout=10).status_code == 404
        assert requests.get(review + "/review/sign-in", timeout=10).status_code == 200
        assert requests.get(review + "/cds-services", timeout=10).status_code == 404
        assert requests.get(review + "/healthz", timeout=10).status_code == 200
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()
