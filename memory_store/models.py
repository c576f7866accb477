"""SQLAlchemy 2.0 tables of loraloop: feedback, conversations, memories, jobs, runs, adapters.

Owns the schema (mirrored by the Alembic migrations in memory_store/migrations) and the two column
types every table shares: timezone-aware UTC timestamps and portable JSON. It knows nothing about
HTTP, training or vLLM; status values are plain strings listed in the `*_STATUSES` tuples.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

FEEDBACK_STATUSES = ("pending", "trained", "skipped")
MEMORY_STATES = ("active", "retired", "baked")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
JOB_ACTIVE_STATUSES = ("queued", "running")
TRAINING_RUN_KINDS = ("train", "distill")
TRAINING_RUN_STATUSES = ("running", "succeeded", "rejected", "failed", "cancelled")
ADAPTER_VERSION_STATUSES = ("candidate", "current", "rejected", "retired", "failed")
DEPLOYMENT_STATES = ("loading", "loaded", "unloading", "unloaded", "failed")

NAMESPACE_LENGTH = 128
AUDIT_LABEL_LENGTH = 64  # service.api.auth token labels


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime (what every timestamp column holds)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite and on PostgreSQL.

    PostgreSQL stores `timestamptz`. SQLite has no time zone type, so the value is stored as naive
    UTC text (fixed-width, so ordering and range filters stay correct) and tagged UTC on the way out.
    A naive datetime given by a caller is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType, list[Any]: JSONType}  # noqa: RUF012


class Conversation(Base):
    """A logged conversation; feedback may point at it instead of resending the messages."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(NAMESPACE_LENGTH))
    messages: Mapped[list[Any]] = mapped_column(JSONType)
    model: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # label of the token entry that wrote it (service.api.auth); never the secret
    created_by: Mapped[str | None] = mapped_column(String(AUDIT_LABEL_LENGTH))

    __table_args__ = (
        Index(None, "namespace", "id"),
        Index(None, "namespace", "created_at"),  # retention by age
    )


class FeedbackItem(Base):
    """One improved continuation for one assistant turn: the unit of online training."""

    __tablename__ = "feedback_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(NAMESPACE_LENGTH))
    messages: Mapped[list[Any]] = mapped_column(JSONType)
    target_index: Mapped[int | None] = mapped_column(Integer)
    continuation: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    memories: Mapped[list[Any] | None] = mapped_column(JSONType)
    tags: Mapped[list[Any] | None] = mapped_column(JSONType)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    trained_in_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # label of the token entry that wrote it (service.api.auth); never the secret
    created_by: Mapped[str | None] = mapped_column(String(AUDIT_LABEL_LENGTH))

    __table_args__ = (
        UniqueConstraint("namespace", "idempotency_key"),
        CheckConstraint(_in("status", FEEDBACK_STATUSES), name="status"),
        Index(None, "namespace", "status", "id"),
        Index(None, "namespace", "created_at"),
        Index(None, "conversation_id"),
    )


class Memory(Base):
    """A namespaced note/fact that agents put in context; distillation bakes it into the adapter."""

    __tablename__ = "memories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(NAMESPACE_LENGTH))
    content: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(String(512))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    tags: Mapped[list[Any] | None] = mapped_column(JSONType)
    state: Mapped[str] = mapped_column(String(16), default="active")
    baked_in_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # label of the token entry that wrote it (service.api.auth); never the secret
    created_by: Mapped[str | None] = mapped_column(String(AUDIT_LABEL_LENGTH))
    retired_by: Mapped[str | None] = mapped_column(String(AUDIT_LABEL_LENGTH))

    __table_args__ = (
        CheckConstraint(_in("state", MEMORY_STATES), name="state"),
        Index(None, "namespace", "state", "id"),
    )


class Job(Base):
    """A durable unit of background work (train, distill, swap, ...) claimed under a lease."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    namespace: Mapped[str | None] = mapped_column(String(NAMESPACE_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    dedupe_key: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # label of the token entry that wrote it (service.api.auth); never the secret
    created_by: Mapped[str | None] = mapped_column(String(AUDIT_LABEL_LENGTH))
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        # the claim query: runnable queued jobs in id order, and expired leases
        Index(None, "status", "run_after", "id"),
        Index(None, "status", "lease_expires_at"),
        Index(None, "namespace", "id"),
        # at most one queued-or-running job per dedupe key (partial unique index on both backends)
        Index(
            "uq_jobs_active_dedupe_key",
            "dedupe_key",
            unique=True,
            sqlite_where=text(_in("status", JOB_ACTIVE_STATUSES)),
            postgresql_where=text(_in("status", JOB_ACTIVE_STATUSES)),
        ),
    )


class TrainingRun(Base):
    """One training or distillation attempt, whatever its outcome."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    namespace: Mapped[str] = mapped_column(String(NAMESPACE_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")
    parent_version: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[int | None] = mapped_column(Integer)
    feedback_from_id: Mapped[int | None] = mapped_column(Integer)
    feedback_to_id: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(_in("kind", TRAINING_RUN_KINDS), name="kind"),
        CheckConstraint(_in("status", TRAINING_RUN_STATUSES), name="status"),
        Index(None, "namespace", "id"),
        Index(None, "job_id"),
    )


class Adapter(Base):
    """The adapter of one namespace (name == namespace) and the pointer to its current version."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(NAMESPACE_LENGTH), primary_key=True)
    current_version: Mapped[int | None] = mapped_column(Integer)
    base_model: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", order_by="AdapterVersion.version", cascade="all, delete-orphan"
    )


class AdapterVersion(Base):
    """One immutable adapter version on disk (`<data_dir>/adapters/<name>/v<version>/`).

    Retention may delete the folder of an old retired version: the row stays as a tombstone
    (metrics and lineage kept) with `path` cleared and `files_deleted_at` set. `pinned` versions
    and those retention must keep are never deleted.
    """

    __tablename__ = "adapter_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_name: Mapped[str] = mapped_column(ForeignKey("adapters.name", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    parent_version: Mapped[int | None] = mapped_column(Integer)
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    path: Mapped[str | None] = mapped_column(String(2048))
    sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    reason: Mapped[str | None] = mapped_column(Text)
    feedback_from_id: Mapped[int | None] = mapped_column(Integer)
    feedback_to_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column()  # when it stopped being current
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    files_deleted_at: Mapped[datetime | None] = mapped_column()

    adapter: Mapped[Adapter] = relationship(back_populates="versions")

    __table_args__ = (
        UniqueConstraint("adapter_name", "version"),
        CheckConstraint(_in("status", ADAPTER_VERSION_STATUSES), name="status"),
        Index(None, "adapter_name", "status", "version"),
    )


class Deployment(Base):
    """What one vLLM replica serves: adapter version `version` of `adapter_name` as `served_name`."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_name: Mapped[str] = mapped_column(ForeignKey("adapters.name", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    replica_url: Mapped[str] = mapped_column(String(1024))
    served_name: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default="loading")
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("replica_url", "served_name"),
        CheckConstraint(_in("state", DEPLOYMENT_STATES), name="state"),
        Index(None, "adapter_name", "version"),
    )
