"""Alembic environment of the service database, run on the connection handed in by
:meth:`her2low.core.database.Migrations.upgrade` (online mode only)."""

from __future__ import annotations

from alembic import context

from cds_service.orm import Base

config = context.config
if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; use `her2low db upgrade`")
context.configure(
    connection=config.attributes["connection"],
    target_metadata=Base.metadata,
    version_table=config.attributes["version_table"],
)
with context.begin_transaction():
    context.run_migrations()
