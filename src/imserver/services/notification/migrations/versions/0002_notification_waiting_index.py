"""The outbox's index of pushes not sent yet, led by kind and state.

Revision ID: notification_0002
Revises: notification_0001
Create Date: 2026-12-05

An ingest looks up the waiting ``message`` pushes of a batch's users, and a ``read``
the waiting one of a device. Led by ``user_id``, the old index scanned every push a
user ever had within the retention; led by ``(kind, state)``, only the waiting ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "notification_0002"
down_revision: str | Sequence[str] | None = "notification_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = ["kind", "state", "user_id", "device", "conv"]
OLD = ["user_id", "device", "conv", "kind", "state"]


def upgrade() -> None:
    """Replace ``ix_push_jobs_target`` by ``ix_push_jobs_waiting``."""
    op.create_index("ix_push_jobs_waiting", "push_jobs", NEW)
    op.drop_index("ix_push_jobs_target", table_name="push_jobs")


def downgrade() -> None:
    """Restore ``ix_push_jobs_target``."""
    op.create_index("ix_push_jobs_target", "push_jobs", OLD)
    op.drop_index("ix_push_jobs_waiting", table_name="push_jobs")
