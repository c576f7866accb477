"""Initial schema: feedback, conversations, memories, jobs, training runs, adapters, deployments.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 17:48:27.872243
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSONB on PostgreSQL, JSON text elsewhere (same as memory_store.models.JSONType, frozen here).
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=True),
        sa.Column("base_model", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_adapters")),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=128), nullable=False),
        sa.Column("messages", JSON_TYPE, nullable=False),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("source", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(op.f("ix_conversations_namespace_id"), "conversations", ["namespace", "id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("namespace", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", JSON_TYPE, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=256), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("progress", JSON_TYPE, nullable=True),
        sa.Column("result", JSON_TYPE, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("dedupe_key", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_namespace_id"), "jobs", ["namespace", "id"], unique=False)
    op.create_index(
        op.f("ix_jobs_status_lease_expires_at"), "jobs", ["status", "lease_expires_at"], unique=False
    )
    op.create_index(op.f("ix_jobs_status_run_after_id"), "jobs", ["status", "run_after", "id"], unique=False)
    op.create_index(
        "uq_jobs_active_dedupe_key",
        "jobs",
        ["dedupe_key"],
        unique=True,
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )

    op.create_table(
        "memories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=128), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("title", sa.String(length=512), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("tags", JSON_TYPE, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("baked_in_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('active', 'retired', 'baked')", name=op.f("ck_memories_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memories")),
    )
    op.create_index(
        op.f("ix_memories_namespace_state_id"), "memories", ["namespace", "state", "id"], unique=False
    )

    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("replica_url", sa.String(length=1024), nullable=False),
        sa.Column("served_name", sa.String(length=256), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('loading', 'loaded', 'unloading', 'unloaded', 'failed')",
            name=op.f("ck_deployments_state"),
        ),
        sa.ForeignKeyConstraint(
            ["adapter_name"],
            ["adapters.name"],
            name=op.f("fk_deployments_adapter_name_adapters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint(
            "replica_url", "served_name", name=op.f("uq_deployments_replica_url_served_name")
        ),
    )
    op.create_index(
        op.f("ix_deployments_adapter_name_version"), "deployments", ["adapter_name", "version"], unique=False
    )

    op.create_table(
        "feedback_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=128), nullable=False),
        sa.Column("messages", JSON_TYPE, nullable=False),
        sa.Column("target_index", sa.Integer(), nullable=True),
        sa.Column("continuation", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("memories", JSON_TYPE, nullable=True),
        sa.Column("tags", JSON_TYPE, nullable=True),
        sa.Column("conversation_id", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trained_in_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'trained', 'skipped')", name=op.f("ck_feedback_items_status")
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_feedback_items_conversation_id_conversations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback_items")),
        sa.UniqueConstraint(
            "namespace", "idempotency_key", name=op.f("uq_feedback_items_namespace_idempotency_key")
        ),
    )
    op.create_index(
        op.f("ix_feedback_items_conversation_id"), "feedback_items", ["conversation_id"], unique=False
    )
    op.create_index(
        op.f("ix_feedback_items_namespace_created_at"),
        "feedback_items",
        ["namespace", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_feedback_items_namespace_status_id"),
        "feedback_items",
        ["namespace", "status", "id"],
        unique=False,
    )

    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("namespace", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("feedback_from_id", sa.Integer(), nullable=True),
        sa.Column("feedback_to_id", sa.Integer(), nullable=True),
        sa.Column("metrics", JSON_TYPE, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('train', 'distill')", name=op.f("ck_training_runs_kind")),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'rejected', 'failed', 'cancelled')",
            name=op.f("ck_training_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_training_runs_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_job_id"), "training_runs", ["job_id"], unique=False)
    op.create_index(op.f("ix_training_runs_namespace_id"), "training_runs", ["namespace", "id"], unique=False)

    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("training_run_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=2048), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("metrics", JSON_TYPE, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("feedback_from_id", sa.Integer(), nullable=True),
        sa.Column("feedback_to_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('candidate', 'current', 'rejected', 'retired', 'failed')",
            name=op.f("ck_adapter_versions_status"),
        ),
        sa.ForeignKeyConstraint(
            ["adapter_name"],
            ["adapters.name"],
            name=op.f("fk_adapter_versions_adapter_name_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["training_run_id"],
            ["training_runs.id"],
            name=op.f("fk_adapter_versions_training_run_id_training_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("adapter_name", "version", name=op.f("uq_adapter_versions_adapter_name_version")),
    )


def downgrade() -> None:
    op.drop_table("adapter_versions")
    op.drop_table("training_runs")
    op.drop_table("feedback_items")
    op.drop_table("deployments")
    op.drop_table("memories")
    op.drop_table("jobs")
    op.drop_table("conversations")
    op.drop_table("adapters")
