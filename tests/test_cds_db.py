"""Migrations run programmatically; the app refuses an un-migrated database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from test_cds_support import FakePredictor

from cds_service.app import create_app
from cds_service.db import MIGRATIONS
from her2low.core.database import NotMigratedError, display_url, make_engine, session_factory
from her2low.core.settings import Settings


def test_upgrade_is_idempotent_and_creates_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cds.db'}"
    MIGRATIONS.upgrade(url)
    MIGRATIONS.upgrade(url)
    MIGRATIONS.check_current(url)
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {
        "results",
        "result_revisions",
        "descriptors",
        "predictions",
        "feedback",
        "audit",
        "jti_replay",
        "alembic_version",
    } <= tables


def test_unmigrated_database_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(NotMigratedError, match=r"is not migrated .*: run `her2low db upgrade`"):
        MIGRATIONS.check_current(url)
    settings = Settings(home=tmp_path, cds_db_url=url)
    with pytest.raises(NotMigratedError, match="her2low db upgrade"):
        create_app(settings, runtime=FakePredictor())


def test_password_hidden_in_message() -> None:
    message = display_url("postgresql://user:secret@db.invalid/cds")
    assert "secret" not in message


def test_schema_and_hot_query_compile_for_postgresql() -> None:
    """No SQLite-only SQL: the DDL and the hook query compile for PostgreSQL."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from cds_service.orm import Base

    dialect = postgresql.dialect()
    for table in Base.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=dialect))
        assert "AUTOINCREMENT" not in ddl.upper()
        for index in table.indexes:
            str(CreateIndex(index).compile(dialect=dialect))


def test_write_gate_serializes_sqlite_writers_and_reopens_after_fork(tmp_path: Path) -> None:
    """The hot-path write gate: one writer at a time per host, per process descriptor."""
    import os
    import threading
    import time
    import uuid

    from cds_service.store import Store, UsedToken

    url = f"sqlite:///{tmp_path / 'cds.db'}"
    MIGRATIONS.upgrade(url)
    engine = make_engine(url)
    try:
        store = Store(session_factory(engine))
        gate = store.write_gate
        assert gate.path == f"{tmp_path / 'cds.db'}.write-lock"
        inside = 0
        most = 0
        guard = threading.Lock()

        def writer() -> None:
            nonlocal inside, most
            for _ in range(20):
                with gate():
                    with guard:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.0005)
                    with guard:
                        inside -= 1
                exp = int(time.time()) + 60
                assert store.record_call(UsedToken.of("iss", str(uuid.uuid4()), exp, 0), ())

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert most == 1
        gate._pid = -1  # as after a fork: flock is per open file description, so reopen
        with gate():
            pass
        assert gate._fd is not None and gate._pid == os.getpid()
    finally:
        engine.dispose()
    memory = make_engine("sqlite://")
    try:
        assert Store(session_factory(memory)).write_gate.path is None
    finally:
        memory.dispose()
