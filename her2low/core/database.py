"""Database engines and Alembic migrations, one copy for both components.

Each component keeps its own migration folder and version table (it may live in its own
database); both use these to build an engine, upgrade, and refuse to start on a database that is
not at its head revision.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from her2low.core.private_files import create_private_file


class NotMigratedError(RuntimeError):
    """The database is missing or behind its migrations; the message says what to run."""


def display_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


#: Driver-less PostgreSQL URLs as integrators write them; the project installs psycopg 3
#: (``pip install her2low-cds[postgres]``), not SQLAlchemy's default psycopg2.
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def engine_url(url: str) -> URL:
    """``url`` with the driver this project ships: ``postgresql://`` → ``postgresql+psycopg://``.

    The one place the mapping lives, so the node, the service and both migration runners
    accept the plain URL every PostgreSQL tool understands.
    """
    parsed = make_url(url)
    if parsed.drivername in _POSTGRES_SCHEMES:
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str) -> Engine:
    """An engine for concurrent writers.

    SQLite runs in WAL mode with a busy timeout and foreign keys: WAL + ``synchronous=NORMAL``
    survives a process crash, and after power loss the node rebuilds its index from the fsynced
    files. Network databases get a liveness check on checkout (:func:`ping_when_idle`).
    """
    parsed = engine_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(parsed)
        ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:" and not parsed.query.get("mode"):
        # 0640 before SQLite creates it 0644: its -wal and -shm files copy the file's mode
        create_private_file(Path(parsed.database))
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


#: A pooled connection used less than this long ago is handed out without a ping (HikariCP's
#: ``aliveBypassWindowMs``, 500 ms by default, is the same rule).
ALIVE_WINDOW_SECONDS = 0.5
_IDLE_SINCE = "her2low_idle_since"


def ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection on checkout only if it sat idle for ``ALIVE_WINDOW_SECONDS``.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: on PostgreSQL one more round trip
    per hook call, per results post, per job step. Servers, proxies and firewalls drop
    connections that sat idle, not ones in use a moment ago, so a connection checked in within
    the window is trusted; an older one is pinged, and if the ping fails the pool discards it
    and connects afresh (``DisconnectionError`` in a checkout event, SQLAlchemy's documented
    pessimistic disconnect handling). A server restart inside the window fails the statement
    that follows, as with no ping at all.
    """
    dialect = engine.dialect

    def _idle_from_now(_dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    event.listen(engine, "connect", _idle_from_now)  # a new connection needs no ping
    event.listen(engine, "checkin", _idle_from_now)

    @event.listens_for(engine, "checkout")
    def _checked_out(
        dbapi: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is not None and time.monotonic() - since < ALIVE_WINDOW_SECONDS:
            return
        try:
            dialect.do_ping(dbapi)
        except dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"pooled connection is gone: {type(exc).__name__}") from exc


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (they are handed to templates, jobs)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


class Migrations:
    """One component's migration folder and version table."""

    def __init__(self, script_location: Path, *, what: str, version_table: str) -> None:
        self.script_location = script_location
        self.what = what
        self.version_table = version_table

    def _config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(self.script_location))
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def head(self) -> str | None:
        return ScriptDirectory.from_config(self._config()).get_current_head()

    def upgrade(self, url: str, revision: str = "head") -> None:
        """Apply migrations up to ``revision`` (idempotent)."""
        engine = make_engine(url)
        try:
            with engine.begin() as connection:
                cfg = self._config()
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, revision)
        finally:
            engine.dispose()

    def current(self, engine: Engine) -> str | None:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"version_table": self.version_table}
            )
            return context.get_current_revision()

    def check_current(self, url: str, engine: Engine | None = None) -> None:
        """Raise :class:`NotMigratedError` unless the database at ``url`` is at the head."""
        parsed = make_url(url)
        is_file = parsed.get_backend_name() == "sqlite" and parsed.database
        if is_file and not Path(str(parsed.database)).exists():
            self._refuse(url, None)
        own = engine is None
        eng = engine or make_engine(url)
        try:
            current = self.current(eng)
        finally:
            if own:
                eng.dispose()
        if current != self.head():
            self._refuse(url, current)

    def _refuse(self, url: str, current: str | None) -> None:
        raise NotMigratedError(
            f"the {self.what} database at {display_url(url)} is not migrated "
            f"(at {current or 'no revision'}, head is {self.head()}): run `her2low db upgrade`"
        )
