"""The conversation counters that several writers on one server database share.

Revision ID: message_0005
Revises: message_0004
Create Date: 2026-12-05

PostgreSQL and MySQL/MariaDB only (``imserver.services.message.counters`` says how
seqs are allocated with them): ``conv_seqs`` holds each conversation's last seq, and
is filled here from the messages already stored. SQLite keeps one writer per
database and needs no counters.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "message_0005"
down_revision: str | Sequence[str] | None = "message_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``conv_seqs`` and count every conversation's stored messages into it."""
    if op.get_bind().dialect.name == "sqlite":
        return
    op.create_table(
        "conv_seqs",
        sa.Column("conv", sa.String(200), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("conv", name="pk_conv_seqs"),
    )
    op.execute(
        "INSERT INTO conv_seqs (conv, last_seq) SELECT conv, MAX(seq) FROM messages GROUP BY conv"
    )


def downgrade() -> None:
    """Drop ``conv_seqs``."""
    if op.get_bind().dialect.name != "sqlite":
        op.drop_table("conv_seqs")
