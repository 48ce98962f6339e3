"""Alembic migrations of the service database (run by ``cds_service.db.upgrade``)."""
