"""The durable state of :mod:`dicom_node.jobs.results_sync` (migration 0004_export_reports).

Its own module, imported by :mod:`dicom_node.jobs.export`, so that the tables are on the node's
metadata wherever the exports table is (Alembic, schema comparisons), without an import cycle.
"""

from __future__ import annotations

import time

from sqlalchemy import Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.db import Base

__all__ = ["ExportReported", "MeasurementReportRecord", "SyncState"]


class ExportReported(Base):
    """What the service was last told about one export (``export_reports``)."""

    __tablename__ = "export_reports"

    export_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: The export row's ``updated_at`` when it was last reported: differs → report again.
    reported_updated_at: Mapped[float] = mapped_column(Float, default=0.0)
    reported_state: Mapped[str] = mapped_column(String(16), default="")
    reported_at: Mapped[float] = mapped_column(Float, default=0.0)
    #: Why the service refused the report ("" when it took it); not retried until a change.
    refused: Mapped[str] = mapped_column(Text, default="")


class MeasurementReportRecord(Base):
    """One SR the node wrote for an analysed series: the original (instance 1) or a revision."""

    __tablename__ = "measurement_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    pipeline_version: Mapped[str] = mapped_column(String(64))
    #: SOP Instance UID of the original SR: the analysis (and export batch) the row belongs to.
    original_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sr_series_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    #: :meth:`AssessmentContent.key` of what the SR carries (descriptors, likelihood, ...).
    content_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SyncState(Base):
    """Small named values of the sync loop (the assessment cursor)."""

    __tablename__ = "sync_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
