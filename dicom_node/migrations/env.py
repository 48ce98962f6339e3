"""Alembic environment of the node database, run on the connection handed in by
:meth:`her2low.core.database.Migrations.upgrade`."""

from alembic import context

import dicom_node.jobs.export  # noqa: F401  (its Export table is on the same Base)
from dicom_node.db import Base

config = context.config
context.configure(
    connection=config.attributes["connection"],
    target_metadata=Base.metadata,
    version_table=config.attributes["version_table"],
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
