"""Alembic environment: runs on the connection handed in by ``cds_service.db.upgrade``.

Online mode only; a URL in the config (``sqlalchemy.url``) is honoured for ad-hoc CLI use.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from cds_service.orm import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; use `her2low db upgrade`")
run_migrations_online()
