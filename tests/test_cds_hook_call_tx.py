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
from sqlalchemy import Engine, text

from cds_service.db import MIGRATIONS
from cds_service.store import AuditTuple, StaleLookupError, Store, UsedToken
from her2low.core.database import make_engine, session_factory
from tests.scaled_servers import Postgres, postgres_for_tests


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def server(request: pytest.FixtureRequest) -> Iterator[Postgres | None]:
    """None for SQLite files; one real PostgreSQL for the module (a database per test)."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_for_tests() as pg:
        yield pg


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


@pytest.mark.integration
@pytest.mark.parametrize("server", ["postgresql"], indirect=True)  # the write is PostgreSQL's
def test_postgresql_records_the_call_in_one_statement(engine: Engine, tmp_path: Path) -> None:
    """Autocommit on PostgreSQL: the generation, the lookup and ONE INSERT (the jti CTE feeding
    the audit), with no BEGIN or COMMIT: read from libpq's own protocol trace of the call."""
    store = Store(session_factory(engine))
    trace = tmp_path / "libpq.trace"
    conn = store.hook_connection()
    try:
        pgconn = conn.dbapi.pgconn
        with trace.open("w") as sink:
            pgconn.trace(sink.fileno())
            try:
                store.hook_rows([("HOSP", "MRN-1")], conn)
                assert store.record_call(_token(), SHOWN, conn)
            finally:
                pgconn.untrace()
    finally:
        conn.close()
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    frontend = [fields[3].split()[0] for fields in sent if len(fields) > 3 and fields[1] == "F"]
    assert frontend.count("Sync") == 3, frontend  # three statements, each one round trip
    text_sent = trace.read_text().upper()
    assert "BEGIN" not in text_sent and "COMMIT" not in text_sent
    assert '"WITH USED_JTI' in text_sent or "WITH USED_JTI" in text_sent
    assert _audits(engine) == 1


# --- the hook generation (migration 0006) and the reused lookup's check -------------------------


def _generation(store: Store) -> int | None:
    return store.hook_rows([]).generation


def _published(store: Store, patient_id: str = "MRN-1") -> str:
    from test_cds_support import result_payload

    from cds_service.schema import parse_result

    result_id, _status = store.ingest_result(parse_result(result_payload(patient_id=patient_id)))
    return result_id


def test_every_write_to_results_or_predictions_bumps_the_generation(engine: Engine) -> None:
    """Triggers, not application code: plain SQL writes count as well."""
    store = Store(session_factory(engine))
    start = _generation(store)
    assert start is not None
    result_id = _published(store)
    after_publish = _generation(store)
    assert after_publish is not None and after_publish > start
    statements = [
        f"UPDATE results SET review_flag = 'identity-ambiguous' WHERE id = '{result_id}'",
        "INSERT INTO predictions (result_id, revision, card_uuid, observation_status, "
        f"computed_at) VALUES ('{result_id}', 1, '{uuid.uuid4()}', 'preliminary', "
        "CURRENT_TIMESTAMP)",
        "UPDATE predictions SET observation_status = 'entered-in-error'",
        "DELETE FROM predictions",
    ]
    seen = after_publish
    for statement in statements:
        with engine.begin() as conn:
            conn.execute(text(statement))
        now = _generation(store)
        assert now is not None and now > seen, statement
        seen = now
    with engine.begin() as conn:  # a write elsewhere (the audit trail) changes nothing
        conn.execute(text("DELETE FROM jti_replay"))
    assert _generation(store) == seen


def test_the_lookup_reads_what_the_orm_stored(engine: Engine) -> None:
    """The driver-level lookup returns the ORM's values, types included (aware UTC times)."""
    store = Store(session_factory(engine))
    result_id = _published(store)
    (row,) = store.hook_rows([("HOSP", "MRN-1"), ("OTHER", "MRN-1")]).rows
    case = store.case(result_id)
    assert case is not None
    assert row.result_id == result_id
    assert (row.patient_issuer, row.patient_id) == ("HOSP", "MRN-1")
    assert row.acquired_at == case.revision.acquired_at
    assert row.acquired_at.utcoffset() is not None and row.acquired_at.utcoffset().seconds == 0
    assert store.hook_rows([("HOSP", "MRN-2")]).rows == []


@pytest.mark.parametrize("events", [SHOWN, DISCORDANT, []], ids=["shown", "discordant", "none"])
def test_a_call_on_an_outdated_lookup_writes_nothing(
    engine: Engine, events: list[AuditTuple]
) -> None:
    store = Store(session_factory(engine))
    conn = store.hook_connection()
    token = _token()
    try:
        looked = store.hook_rows([("HOSP", "MRN-1")], conn)
        assert looked.generation is not None
        _published(store)  # another writer changes what the lookup saw
        before = _audits(engine)
        with pytest.raises(StaleLookupError):
            store.record_call(token, events, conn, looked.generation)
        assert _audits(engine) == before
        fresh = store.hook_rows([("HOSP", "MRN-1")], conn)
        assert len(fresh.rows) == 1
        assert store.record_call(token, events, conn, fresh.generation)  # the token is unused
    finally:
        conn.close()
    assert _audits(engine) == before + len(events)
    assert not _call(store, token, SHOWN)  # and now it is used
