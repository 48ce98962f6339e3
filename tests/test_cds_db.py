"""Migrations run programmatically; the app refuses an un-migrated database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from test_cds_support import FakePredictor

from cds_service import db
from cds_service.app import create_app
from her2low.settings import Settings


def test_upgrade_is_idempotent_and_creates_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cds.db'}"
    db.upgrade(url)
    db.upgrade(url)
    db.check_current(url)
    engine = db.make_engine(url)
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
    with pytest.raises(
        db.DatabaseNotMigratedError, match=r"is not migrated: run `her2low db upgrade`"
    ):
        db.check_current(url)
    settings = Settings(home=tmp_path, cds_db_url=url)
    with pytest.raises(db.DatabaseNotMigratedError, match="her2low db upgrade"):
        create_app(settings, runtime=FakePredictor())


def test_password_hidden_in_message() -> None:
    message = db._display("postgresql://user:secret@db.invalid/cds")
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
