"""Alembic driven from code: ``her2low db upgrade`` and the start-up check share these.

Each component (node, service) keeps its own migration folder and version table; start-up
refuses to run on a database that is not at the head revision.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine


class NotMigratedError(RuntimeError):
    """The database is missing or behind its migrations."""


def _config(script_location: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def upgrade(script_location: Path, url: str) -> None:
    """Apply all migrations up to head."""
    _ensure_sqlite_folder(url)
    command.upgrade(_config(script_location, url), "head")


def check_current(
    script_location: Path, url: str, *, what: str, version_table: str = "alembic_version"
) -> None:
    """Raise :class:`NotMigratedError` unless ``url`` is at the head revision."""
    head = ScriptDirectory.from_config(_config(script_location, url)).get_current_head()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        current = None
    else:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                current = MigrationContext.configure(
                    conn, opts={"version_table": version_table}
                ).get_current_revision()
        finally:
            engine.dispose()
    if current != head:
        raise NotMigratedError(
            f"the {what} database is not migrated (at {current or 'no revision'}, "
            f"head is {head}): run `her2low db upgrade`"
        )
