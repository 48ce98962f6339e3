"""Engine, sessions and Alembic migrations of the service database.

Migrations run programmatically (``upgrade(url)``) so ``her2low db upgrade`` and the tests use
the same path; ``check_current(url)`` lets ``create_app`` refuse an un-migrated database rather
than fail later on a missing table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class DatabaseNotMigratedError(RuntimeError):
    """The database schema is older than the code (or absent)."""


def _display(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys for multi-process use."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() != "sqlite":
        kwargs["pool_pre_ping"] = True  # network databases drop idle connections; files do not
    else:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            cfg = _alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def head_revision() -> str:
    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        heads = MigrationContext.configure(connection).get_current_heads()
    return heads[0] if heads else None


def check_current(url: str, engine: Engine | None = None) -> None:
    """Raise DatabaseNotMigratedError unless the database is at the migrations' head."""
    own = engine is None
    eng = engine or make_engine(url)
    try:
        current = current_revision(eng)
    finally:
        if own:
            eng.dispose()
    if current != head_revision():
        raise DatabaseNotMigratedError(
            f"database at {_display(url)} is not migrated: run `her2low db upgrade` "
            f"(it is at {current or 'no revision'}, the code needs {head_revision()})"
        )
