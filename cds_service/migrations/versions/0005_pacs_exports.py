"""export states of the results sent to the PACS; predictions indexed by computed_at

Revision ID: 0005_pacs_exports
Revises: 0004_pathology
Create Date: 2026-12-01 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_pacs_exports"
down_revision = "0004_pathology"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pacs_exports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("result_id", sa.String(length=36), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("objects", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("result_id", "destination", name="uq_pacs_export_destination"),
    )
    op.create_index("ix_predictions_computed", "predictions", ["computed_at"])


def downgrade() -> None:
    op.drop_index("ix_predictions_computed", table_name="predictions")
    op.drop_table("pacs_exports")
