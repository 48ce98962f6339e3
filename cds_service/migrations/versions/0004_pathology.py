"""pathology HER2 results for the concordance view

Revision ID: 0004_pathology
Revises: 0003_worklist
Create Date: 2026-12-01 10:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_pathology"
down_revision = "0003_worklist"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pathology_results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("result_id", sa.String(length=36), nullable=False),
        sa.Column("her2", sa.String(length=16), nullable=False),
        sa.Column("score", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("source_key", sa.String(length=128), nullable=False),
        sa.Column("entered_by", sa.String(length=256), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("result_id", "source_key", name="uq_pathology_source"),
    )
    op.create_index("ix_pathology_result", "pathology_results", ["result_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_pathology_result", table_name="pathology_results")
    op.drop_table("pathology_results")
