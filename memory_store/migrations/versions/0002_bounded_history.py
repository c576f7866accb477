"""Bounded history: indexes for retention and paginated version lists; version tombstones and pins.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_conversations_namespace_created_at"),
        "conversations",
        ["namespace", "created_at"],
        unique=False,
    )
    op.add_column("adapter_versions", sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "adapter_versions",
        sa.Column("pinned", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "adapter_versions", sa.Column("files_deleted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        op.f("ix_adapter_versions_adapter_name_status_version"),
        "adapter_versions",
        ["adapter_name", "status", "version"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_adapter_versions_adapter_name_status_version"), table_name="adapter_versions")
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("files_deleted_at")
        batch.drop_column("pinned")
        batch.drop_column("retired_at")
    op.drop_index(op.f("ix_conversations_namespace_created_at"), table_name="conversations")
