"""The pool's liveness check on a real PostgreSQL (``her2low.core.database.ping_when_idle``).

A connection checked in less than ``ALIVE_WINDOW_SECONDS`` ago is handed out without a ping
(no extra round trip per hook call under load); an older one is pinged, and one the server
dropped meanwhile is replaced before anyone uses it. A dropped connection inside the window
fails its statement, and the service answers that request with a 503 OperationOutcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from test_cds_support import RESULTS_TOKEN, start_service, stop_service

from her2low.core import database
from her2low.core.database import make_engine
from tests.scaled_servers import Postgres, postgres_for_tests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    with postgres_for_tests() as pg:
        yield pg


@pytest.fixture
def engine(server: Postgres) -> Iterator[Engine]:
    engine = make_engine(server.create_database(f"ping_{uuid.uuid4().hex[:12]}"))
    yield engine
    engine.dispose()


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each ping the pool sends (the dialect's own ``do_ping``, still run for real)."""
    sent: list[object] = []
    real = engine.dialect.do_ping

    def counted(dbapi: object) -> bool:
        sent.append(dbapi)
        return real(dbapi)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return sent


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(engine: Engine, pid: int | None = None) -> int:
    """Drop backend ``pid`` of the engine's database from the server side, as an idle timeout
    would, or (``None``) every backend but the one asking, as a restart would."""
    other = make_engine(engine.url.render_as_string(hide_password=False))
    which = "pid = :pid" if pid is not None else "pid <> pg_backend_pid()"
    try:
        with other.connect() as conn:
            dropped = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = current_database() AND {which}"
                ),
                {"pid": pid},
            ).all()
    finally:
        other.dispose()
    assert dropped and all(ok for (ok,) in dropped)
    return len(dropped)


def test_a_connection_checked_in_moments_ago_is_not_pinged(
    engine: Engine, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _backend_pid(engine)  # a new connection: no ping either
    assert _backend_pid(engine) == first  # the same pooled connection, reused at once
    assert pings == []
    monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 0.0)  # now every checkout is "old"
    assert _backend_pid(engine) == first
    assert len(pings) == 1


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(
    engine: Engine, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = _backend_pid(engine)
    _terminate(engine, dropped)
    monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 0.0)
    replaced = _backend_pid(engine)  # the ping fails, the pool connects afresh, the query runs
    assert replaced != dropped
    assert getattr(pings[0], "broken", False)  # the first ping went to the dropped connection


def test_inside_the_window_a_dropped_connection_fails_its_statement(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: without the ping (inside the window) the dead connection is used."""
    dropped = _backend_pid(engine)
    _terminate(engine, dropped)
    monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 3600.0)
    with pytest.raises(OperationalError):
        _backend_pid(engine)
    assert _backend_pid(engine) != dropped  # SQLAlchemy invalidated it; the next one is fresh


def test_the_service_answers_a_dropped_connection_with_503_and_then_recovers(
    server: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that catches a connection inside the window: a 503 OperationOutcome
    (``transient``, ``Retry-After``) for that request, never a 500, and the next one works."""
    url = server.create_database(f"ping_svc_{uuid.uuid4().hex[:12]}")
    svc = start_service(tmp_path, cds_db_url=url)
    try:
        auth = {"Authorization": f"Bearer {RESULTS_TOKEN}"}
        results = f"{svc.url}/api/v1/results"
        assert requests.get(results, headers=auth, timeout=10).status_code == 200
        monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 3600.0)
        _terminate(svc.app.extensions["her2low_cds"].engine)
        failed = requests.get(results, headers=auth, timeout=10)
        assert failed.status_code == 503
        assert failed.headers["Retry-After"] == "1"
        issue = failed.json()["issue"][0]
        assert failed.json()["resourceType"] == "OperationOutcome"
        assert issue["code"] == "transient"
        assert "database" in issue["diagnostics"]
        assert requests.get(results, headers=auth, timeout=10).status_code == 200
    finally:
        stop_service(svc)
