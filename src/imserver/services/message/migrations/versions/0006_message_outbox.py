"""The outbox of ``message.stored`` events.

Revision ID: message_0006
Revises: message_0005
Create Date: 2026-12-05

``message_outbox`` holds the events the writer commits with each batch when the
event stream is on, until the relay has published them
(:mod:`imserver.storage.outbox`). Empty otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from imserver.storage.outbox import create_outbox_table

revision: str = "message_0006"
down_revision: str | Sequence[str] | None = "message_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``message_outbox``."""
    create_outbox_table("message")


def downgrade() -> None:
    """Drop ``message_outbox``."""
    op.drop_table("message_outbox")
