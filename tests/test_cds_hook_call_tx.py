"""A hook call's lookup, jti and audit on one pooled connection (SQLite, and real PostgreSQL).

The hook path checks out one connection per call (``Store.hook_connection``); on PostgreSQL it
runs in autocommit and records the jti and the audit rows in one statement. These tests pin
what must not change with that: a replayed jti is refused on another connection and another
store (a second instance) and audits nothing; a first use is audited exactly once; the rare
discordant call (which also sets the worklist flag) keeps the same guarantees.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text

from cds_service.db import MIGRATIONS
from cds_service.store import AuditTuple, Store, UsedToken
from her2low.core.database import make_engine, session_factory
from tests.scaled_servers import Postgres, ServerUnavailable, postgres_server


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def server(request: pytest.FixtureRequest) -> Iterator[Postgres | None]:
    """None for SQLite files; one real PostgreSQL for the module (a database per test)."""
    if request.param == "sqlite":
        yield None
        return
    try:
        with postgres_server() as pg:
            yield pg
    except ServerUnavailable as exc:
        pytest.fail(f"{exc}; `make test` installs it")


@pytest.fixture
def db_url(server: Postgres | None, tmp_path: Path) -> str:
    url = (
        f"sqlite:///{tmp_path / 'cds.db'}"
        if server is None
        else server.create_database(f"hook_tx_{uuid.uuid4().hex[:12]}")
    )
    MIGRATIONS.upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _audits(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit")).scalar_one())


def _token() -> UsedToken:
    return UsedToken.of("https://ehr.test", str(uuid.uuid4()), int(time.time()) + 120, 30)


def _call(store: Store, token: UsedToken, events: list[AuditTuple]) -> bool:
    """What the hook endpoint does: lookup, then jti + audit, on one connection."""
    conn = store.hook_connection()
    try:
        store.hook_rows([("HOSP", "MRN-1")], conn)
        return store.record_call(token, events, conn)
    finally:
        conn.close()


SHOWN: list[AuditTuple] = [("Practitioner/1", "card-shown", None, {"card": "c-1"})]
DISCORDANT: list[AuditTuple] = [
    ("Practitioner/1", "card-shown", None, {"card": "c-1"}),
    ("Practitioner/1", "discordance-detected", None, {"card": "c-1"}),
]


@pytest.mark.parametrize("events", [SHOWN, DISCORDANT, []], ids=["shown", "discordant", "none"])
def test_first_use_audited_once_and_a_replay_refused_by_another_instance(
    engine: Engine, events: list[AuditTuple]
) -> None:
    first, second = Store(session_factory(engine)), Store(session_factory(engine))
    token = _token()
    assert _call(first, token, events)
    assert _audits(engine) == len(events)
    assert not _call(second, token, events)  # another instance, another connection
    assert not _call(first, token, SHOWN)
    assert _audits(engine) == len(events)  # the replay audited nothing


def test_the_connection_serves_the_next_write_after_a_refused_replay(engine: Engine) -> None:
    store = Store(session_factory(engine))
    used, fresh = _token(), _token()
    assert _call(store, used, SHOWN)
    conn = store.hook_connection()
    try:
        assert not store.record_call(used, SHOWN, conn)
        assert store.record_call(fresh, SHOWN, conn)
    finally:
        conn.close()
    assert _audits(engine) == 2


def test_postgresql_records_the_call_in_one_statement(engine: Engine) -> None:
    """Autocommit on PostgreSQL: the lookup and one INSERT (the jti CTE feeding the audit)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the single-statement write is PostgreSQL's")
    store = Store(session_factory(engine))
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.lstrip().split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert _call(store, _token(), SHOWN)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert statements[-2:] == ["SELECT", "WITH"]
    assert "BEGIN" not in statements and "COMMIT" not in statements
    assert _audits(engine) == 1
