"""Core table handles for the store's prebuilt statements (the ORM classes are in cds_service.orm)."""

from sqlalchemy import Table

from cds_service.orm import AuditEvent, HookGeneration, PredictionRow, Result, UsedJti

RESULTS: Table = Result.__table__  # type: ignore[assignment]
PREDICTIONS: Table = PredictionRow.__table__  # type: ignore[assignment]
AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]
JTI: Table = UsedJti.__table__  # type: ignore[assignment]
GENERATION: Table = HookGeneration.__table__  # type: ignore[assignment]
