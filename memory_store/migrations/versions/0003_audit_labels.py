"""Audit: the token entry (its label) that wrote each conversation, feedback item, memory and job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDITED_TABLES = ("conversations", "feedback_items", "memories", "jobs")


def upgrade() -> None:
    for table in AUDITED_TABLES:
        op.add_column(table, sa.Column("created_by", sa.String(length=64), nullable=True))
    op.add_column("memories", sa.Column("retired_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("memories") as batch:
        batch.drop_column("retired_by")
    for table in AUDITED_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("created_by")
