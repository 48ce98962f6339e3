"""SQLAlchemy 2 table definitions of the service database (schema owned by Alembic migrations).

Portable types only (String, Integer, Float, Boolean, JSON, DateTime) so the same migrations run
on SQLite (default) and PostgreSQL (scaled deployment).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Result(Base):
    """One analysed series per pipeline version: the key the node re-publishes under."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint(
            "series_instance_uid", "pipeline_version", name="uq_results_series_pipeline"
        ),
        Index("ix_results_patient", "patient_issuer", "patient_id"),
        Index("ix_results_study", "study_instance_uid"),
        # covering the filters: the counts per state are read from the index alone
        Index(
            "ix_results_worklist_state",
            "state",
            "study_date",
            "likelihood",
            "lesion_type",
            "discordant",
            "board_date",
        ),
        Index("ix_results_worklist_date", "study_date"),
        Index("ix_results_worklist_board_date", "board_date"),
        Index("ix_results_worklist_likelihood", "likelihood"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    laterality: Mapped[str | None] = mapped_column(String(1), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    review_flag: Mapped[str | None] = mapped_column(String(64), nullable=True)
    observation_override: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # --- the worklist's columns (migration 0003_worklist), kept by cds_service.store -------
    # Copies of facts held elsewhere (payload, latest descriptors/prediction, audit), refreshed
    # in the transaction that changes them, so 10,000 cases filter and sort on indexes.
    patient_name: Mapped[str | None] = mapped_column(String(324), nullable=True)  # PHI
    study_date: Mapped[date | None] = mapped_column(Date(), nullable=True)
    lesion_type: Mapped[str | None] = mapped_column(String(8), nullable=True)
    likelihood: Mapped[float | None] = mapped_column(Float, nullable=True)
    above_threshold: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    state: Mapped[str] = mapped_column(String(24), default="new")  # case_state.CaseState
    discordant: Mapped[bool] = mapped_column(Boolean, default=False)
    board_date: Mapped[date | None] = mapped_column(Date(), nullable=True)
    board_decision: Mapped[str | None] = mapped_column(String(32), nullable=True)
    first_viewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    scored_by: Mapped[str | None] = mapped_column(String(160), nullable=True)  # model, version


class ResultRevision(Base):
    """Every distinct payload received for a result, kept for provenance (never overwritten)."""

    __tablename__ = "result_revisions"
    __table_args__ = (UniqueConstraint("result_id", "revision", name="uq_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"))
    revision: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    laterality: Mapped[str | None] = mapped_column(String(1), nullable=True)
    features: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    previews: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    payload_sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class DescriptorEntry(Base):
    """One version of the radiologist's qualitative descriptors for a case (append-only)."""

    __tablename__ = "descriptors"
    __table_args__ = (UniqueConstraint("result_id", "version", name="uq_descriptor_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"))
    version: Mapped[int] = mapped_column(Integer)
    entered_by: Mapped[str] = mapped_column(String(128))
    entered_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    roi_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)


class PredictionRow(Base):
    """The prediction for one (result revision, descriptors version), with its prepared FHIR."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_result", "result_id", "id"),
        # the node's assessment poll reads predictions in computed_at order (0005_pacs_exports)
        Index("ix_predictions_computed", "computed_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"))
    revision: Mapped[int] = mapped_column(Integer)
    descriptors_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prediction: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    card_uuid: Mapped[str] = mapped_column(String(36), unique=True)
    observation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    observation_status: Mapped[str] = mapped_column(String(32), default="preliminary")
    basis: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    computed_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Feedback(Base):
    """CDS Hooks feedback on a card; unique key makes repeated deliveries idempotent."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("card_uuid", "outcome", "outcome_timestamp", name="uq_feedback"),
        Index("ix_feedback_result", "result_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    card_uuid: Mapped[str] = mapped_column(String(64))
    result_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    accepted_suggestions: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    override_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    user_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    outcome_timestamp: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class AuditEvent(Base):
    """Append-only audit trail: who did what to which case, when. Never updated or deleted."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_result", "result_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    result_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class UsedJti(Base):
    """JWT ids seen, kept until their ``exp`` to refuse replays (CDS Hooks 2.0.1 §Trusting)."""

    __tablename__ = "jti_replay"

    iss: Mapped[str] = mapped_column(String(255), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    exp: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class HookGeneration(Base):
    """One row whose ``n`` database triggers bump on every write to ``results`` or ``predictions``.

    A service process may reuse a hook lookup it made while ``n`` is unchanged: the triggers
    (migration 0006) see every writer, also ones outside this code, so no write path can forget
    to invalidate. The call that reuses a lookup checks ``n`` in its own jti write.
    """

    __tablename__ = "hook_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(BigInteger)


# --- review-app accounts (cds_service.accounts) ------------------------------------------------


class UserAccount(Base):
    """A local review-app account. Never deleted (the audit names it); disabled instead."""

    __tablename__ = "review_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ReviewSession(Base):
    """A signed-in browser; the cookie holds a random token, the row only its SHA-256."""

    __tablename__ = "review_sessions"
    __table_args__ = (Index("ix_review_sessions_user", "user_id"),)

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("review_users.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    client: Mapped[str] = mapped_column(String(64), default="")


class SignInThrottle(Base):
    """Failed sign-ins per user name ('user:…') or client address ('addr:…')."""

    __tablename__ = "review_signin_throttle"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    first_failure_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


# --- pathology HER2 results (concordance, cds_service.review.concordance) ---------------------------


class PathologyResult(Base):
    """A pathology HER2 result for a case: entered by a pathologist or received from the EHR.

    Append-only; the latest by ``reported_at`` counts. ``source_key`` (the FHIR Observation's
    id or a digest of its content) makes a result received again on the next hook call a no-op.
    """

    __tablename__ = "pathology_results"
    __table_args__ = (
        UniqueConstraint("result_id", "source_key", name="uq_pathology_source"),
        Index("ix_pathology_result", "result_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"))
    her2: Mapped[str] = mapped_column(String(16))  # store.Her2Pathology
    score: Mapped[str] = mapped_column(String(32), default="")  # "0", "1+", "2+ ISH-" ...
    source: Mapped[str] = mapped_column(String(16))  # "pathologist" | "ehr"
    source_key: Mapped[str] = mapped_column(String(128))
    entered_by: Mapped[str] = mapped_column(String(256))
    reported_at: Mapped[datetime] = mapped_column(UtcDateTime())
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)


# --- results in the PACS (cds_service.store.exports) ------------------------------------------------


class PacsExport(Base):
    """The latest export state the node reported for one (result, PACS destination).

    One row per destination, replaced by each newer report (``models.contract.ExportStatus``);
    a report older than ``updated_at`` is ignored, so out-of-order deliveries cannot regress it.
    """

    __tablename__ = "pacs_exports"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_pacs_export_destination"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # models.contract.ExportState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    objects: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(500), default="")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())  # the node's clock
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
