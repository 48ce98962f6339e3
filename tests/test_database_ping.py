"""The pool's liveness check on a real PostgreSQL (``her2low.core.database.ping_when_idle``).

A connection checked in less than ``ALIVE_WINDOW_SECONDS`` ago is handed out without a ping
(no extra round trip per hook call under load); an older one is pinged, and one the server
dropped meanwhile is replaced before anyone uses it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from her2low.core import database
from her2low.core.database import make_engine
from tests.scaled_servers import Postgres, ServerUnavailable, postgres_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    try:
        with postgres_server() as pg:
            yield pg
    except ServerUnavailable as exc:
        pytest.fail(f"{exc}; `make test` installs it")


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


def _terminate(server: Postgres, engine: Engine, pid: int) -> None:
    """Drop one backend from the server side, as a restart or an idle timeout would."""
    other = make_engine(engine.url.render_as_string(hide_password=False))
    try:
        with other.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
    finally:
        other.dispose()


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
    server: Postgres, engine: Engine, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = _backend_pid(engine)
    _terminate(server, engine, dropped)
    monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 0.0)
    replaced = _backend_pid(engine)  # the ping fails, the pool connects afresh, the query runs
    assert replaced != dropped
    assert getattr(pings[0], "broken", False)  # the first ping went to the dropped connection


def test_inside_the_window_a_dropped_connection_fails_its_statement(
    server: Postgres, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: without the ping (inside the window) the dead connection is used."""
    dropped = _backend_pid(engine)
    _terminate(server, engine, dropped)
    monkeypatch.setattr(database, "ALIVE_WINDOW_SECONDS", 3600.0)
    with pytest.raises(OperationalError):
        _backend_pid(engine)
    assert _backend_pid(engine) != dropped  # SQLAlchemy invalidated it; the next one is fresh
