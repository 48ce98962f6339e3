"""Alembic environment of the node database (run from code by her2low.migrate)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from dicom_node.db import VERSION_TABLE, Base

config = context.config
connectable = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
