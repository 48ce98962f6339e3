"""the hook lookup's generation: one counter bumped by triggers on results and predictions

Revision ID: 0006_hook_generation
Revises: 0005_pacs_exports
Create Date: 2026-12-01 16:00:00

A service process reuses a patient's hook lookup while ``hook_generation.n`` is unchanged, and
the call checks ``n`` in its jti write. Triggers, not application code, bump it, so every writer
of ``results`` or ``predictions`` (also a manual fix in psql) invalidates the reused lookups.

PostgreSQL: deferred constraint triggers, so the counter row is locked only while the writing
transaction commits (a transaction never waits for another lock after taking it: no deadlock
between writers that touch several results in different orders). SQLite has one writer at a
time and row triggers only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_hook_generation"
down_revision = "0005_pacs_exports"
branch_labels = None
depends_on = None

TABLES = ("results", "predictions")
EVENTS = ("INSERT", "UPDATE", "DELETE")


def upgrade() -> None:
    table = op.create_table(
        "hook_generation",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "n": 0}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION her2low_bump_hook_generation() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN UPDATE hook_generation SET n = n + 1 WHERE id = 1; RETURN NULL; END $$"
        )
        for name in TABLES:
            op.execute(
                f"CREATE CONSTRAINT TRIGGER {name}_hook_generation "
                f"AFTER INSERT OR UPDATE OR DELETE ON {name} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                "EXECUTE FUNCTION her2low_bump_hook_generation()"
            )
        return
    for name in TABLES:
        for what in EVENTS:
            op.execute(
                f"CREATE TRIGGER {name}_{what.lower()}_hook_generation AFTER {what} ON {name} "
                "BEGIN UPDATE hook_generation SET n = n + 1 WHERE id = 1; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in TABLES:
            op.execute(f"DROP TRIGGER {name}_hook_generation ON {name}")
        op.execute("DROP FUNCTION her2low_bump_hook_generation()")
    else:
        for name in TABLES:
            for what in EVENTS:
                op.execute(f"DROP TRIGGER {name}_{what.lower()}_hook_generation")
    op.drop_table("hook_generation")
