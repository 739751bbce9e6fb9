"""Notification service: initial schema (registrations, conv_settings, push_jobs,
push_attempts, push_decisions, push_cursor).

Revision ID: notification_0001
Revises:
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "notification_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the notification service's tables."""
    op.create_table(
        "registrations",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "device", "provider", name="pk_registrations"),
    )
    op.create_index("ix_registrations_device", "registrations", ["device"])
    op.create_table(
        "conv_settings",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("muted_until", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "conv", name="pk_conv_settings"),
    )
    op.create_index("ix_conv_settings_conv", "conv_settings", ["conv"])
    op.create_table(
        "push_jobs",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
    )
    op.create_index("uq_push_jobs_kind_key", "push_jobs", ["kind", "key"], unique=True)
    op.create_index("ix_push_jobs_state_next", "push_jobs", ["state", "next_at"])
    op.create_index("ix_push_jobs_provider_state", "push_jobs", ["provider", "state"])
    op.create_index(
        "ix_push_jobs_target", "push_jobs", ["user_id", "device", "conv", "kind", "state"]
    )
    op.create_table(
        "push_attempts",
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("code", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "n", name="pk_push_attempts"),
    )
    op.create_table(
        "push_decisions",
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("due", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conv", "seq", "user_id", name="pk_push_decisions"),
    )
    op.create_index("ix_push_decisions_created", "push_decisions", ["created"])
    op.create_table(
        "push_cursor",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_push_cursor"),
    )


def downgrade() -> None:
    """Drop the notification service's tables."""
    for table in (
        "push_cursor",
        "push_decisions",
        "push_attempts",
        "push_jobs",
        "conv_settings",
        "registrations",
    ):
        op.drop_table(table)
