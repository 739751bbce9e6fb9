"""Stored ``meta`` values that one of the codecs cannot encode, rewritten.

Revision ID: message_0003
Revises: message_0002
Create Date: 2026-12-05

Before ``send.meta`` was checked against the value model both codecs share
(``imserver.protocol.values``), a JSON client could store an integer past 64 bits or
a value nested deeper than 32 levels. MessagePack cannot encode the first, and an
encoder can overflow the stack on the second, so every read of such a message
(``history``, ``convs``) failed for MessagePack sessions. This revision rewrites
those values into what the model allows, keeping what they said:

* an integer outside ``-2**63 .. 2**63 - 1`` becomes its decimal string;
* a map or array at depth 32 holding deeper containers becomes its JSON text;
* a row whose ``meta`` cannot be read at all keeps its text as ``{"raw": text}``.

Rows are read in pages of the primary key, so the revision's memory stays flat on
any size of table. The rules are spelled out here, not imported, so the revision
keeps doing what it did when the live code moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from alembic import op

revision: str = "message_0003"
down_revision: str | Sequence[str] | None = "message_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
MAX_DEPTH = 32
PAGE = 1000

_messages = sa.table("messages", sa.column("id", sa.BigInteger()), sa.column("meta", sa.Text()))


def _repair(value: Any, depth: int) -> tuple[Any, bool]:
    """``value`` inside the model, and whether anything had to change."""
    if isinstance(value, dict | list):
        if depth == MAX_DEPTH:
            return msgspec.json.encode(value).decode(), True
        if isinstance(value, dict):
            changed = False
            out_map: dict[str, Any] = {}
            for key, sub in value.items():
                out_map[key], sub_changed = _repair(sub, depth + 1)
                changed |= sub_changed
            return out_map, changed
        items = [_repair(sub, depth + 1) for sub in value]
        return [item for item, _ in items], any(changed for _, changed in items)
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        return str(value), True
    return value, False


def repaired(text: str) -> str | None:
    """The rewritten ``meta`` text, or None when ``text`` is within the model."""
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return msgspec.json.encode({"raw": text}).decode()
    fixed, changed = _repair(value, 0)
    return msgspec.json.encode(fixed).decode() if changed else None


def upgrade() -> None:
    """Rewrite every ``meta`` outside the model, a page of rows at a time."""
    bind = op.get_bind()
    last = 0
    while True:
        rows = bind.execute(
            sa.select(_messages.c.id, _messages.c.meta)
            .where(_messages.c.id > last, _messages.c.meta.is_not(None))
            .order_by(_messages.c.id)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        for row_id, text in rows:
            fixed = repaired(text)
            if fixed is not None:
                bind.execute(
                    sa.update(_messages).where(_messages.c.id == row_id).values(meta=fixed)
                )
        last = rows[-1][0]


def downgrade() -> None:
    """Nothing to undo: the rewritten values are valid for the earlier revisions too."""
