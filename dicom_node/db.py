"""The node's index: instances (with versions), series state and analysis jobs.

Timers live here, not in memory: a series' ``last_received_at`` decides its stability, so a
restarted node picks up exactly where it stopped. The schema is created only by Alembic.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

from sqlalchemy import (
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from her2low.core.database import Migrations

MIGRATIONS = Migrations(
    Path(__file__).with_name("migrations"), what="node", version_table="alembic_version_node"
)


class SeriesState(enum.StrEnum):
    """Where a series is in its life: receiving → queued → analysing → done | failed | skipped."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"
    #: Recorded but not analysed (not diffusion, not breast, unusable), with the reason.
    SKIPPED = "skipped"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class Base(DeclarativeBase):
    pass


def _now() -> float:
    return time.time()


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[SeriesState] = mapped_column(
        Enum(SeriesState, native_enum=False, length=16), default=SeriesState.RECEIVING, index=True
    )
    #: Bumped by every instance that adds or changes content; analysis is per generation.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    analysed_generation: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[float] = mapped_column(Float, default=_now)
    last_received_at: Mapped[float] = mapped_column(Float, default=_now, index=True)
    role: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    result_id: Mapped[str] = mapped_column(String(64), default="")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[float] = mapped_column(Float, default=_now)
    #: False once a newer version of the same SOPInstanceUID arrived.
    current: Mapped[bool] = mapped_column(default=True, index=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.QUEUED, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)
    #: A running job holds a lease; an expired lease means its worker died and it is re-queued.
    lease_expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    result_id: Mapped[str] = mapped_column(String(64), default="")
    #: Seconds from the series' last instance to published features (for the benchmark).
    latency_seconds: Mapped[float] = mapped_column(Float, default=0.0)
