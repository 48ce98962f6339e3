"""The service database's migrations (engines and the migration runner are in her2low.core)."""

from __future__ import annotations

from pathlib import Path

from her2low.core.database import Migrations

MIGRATIONS = Migrations(
    Path(__file__).resolve().parent / "migrations", what="service", version_table="alembic_version"
)
