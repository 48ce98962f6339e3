"""worklist columns on results: identity, state, likelihood, discordance, board date

Revision ID: 0003_worklist
Revises: 0002_review_accounts
Create Date: 2026-12-01 10:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_worklist"
down_revision = "0002_review_accounts"
branch_labels = None
depends_on = None

_INDEXES = {
    # covering the filters: the counts per state are read from the index alone
    "ix_results_worklist_state": [
        "state",
        "study_date",
        "likelihood",
        "lesion_type",
        "discordant",
        "board_date",
    ],
    "ix_results_worklist_date": ["study_date"],
    "ix_results_worklist_board_date": ["board_date"],
    "ix_results_worklist_likelihood": ["likelihood"],
}


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("patient_name", sa.String(length=324), nullable=True))
        batch.add_column(sa.Column("study_date", sa.Date(), nullable=True))
        batch.add_column(sa.Column("lesion_type", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("likelihood", sa.Float(), nullable=True))
        batch.add_column(sa.Column("above_threshold", sa.Boolean(), nullable=True))
        batch.add_column(
            sa.Column("state", sa.String(length=24), nullable=False, server_default="new")
        )
        batch.add_column(
            sa.Column("discordant", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("board_date", sa.Date(), nullable=True))
        batch.add_column(sa.Column("board_decision", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("first_viewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("scored_by", sa.String(length=160), nullable=True))
    for name, columns in _INDEXES.items():
        op.create_index(name, "results", columns)
    # Backfill what plain SQL can: the latest probability, the withdrawn / amended cases and
    # the cases with descriptors. The rest is refreshed by the store on the next write.
    op.execute(
        "UPDATE results SET likelihood = (SELECT p.probability FROM predictions p "
        "WHERE p.result_id = results.id ORDER BY p.id DESC LIMIT 1)"
    )
    op.execute(
        "UPDATE results SET state = 'descriptors-needed' "
        "WHERE id IN (SELECT result_id FROM descriptors)"
    )
    op.execute("UPDATE results SET state = 'discussed' WHERE observation_override = 'amended'")
    op.execute(
        "UPDATE results SET state = 'closed' WHERE observation_override = 'entered-in-error'"
    )
    op.execute(
        "UPDATE results SET discordant = TRUE WHERE id IN "
        "(SELECT result_id FROM audit WHERE action = 'discordance-detected')"
    )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="results")
    with op.batch_alter_table("results") as batch:
        for column in (
            "scored_by",
            "first_viewed_at",
            "board_decision",
            "board_date",
            "discordant",
            "state",
            "above_threshold",
            "likelihood",
            "lesion_type",
            "study_date",
            "patient_name",
        ):
            batch.drop_column(column)
