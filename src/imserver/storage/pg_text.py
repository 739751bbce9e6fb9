"""Text with NUL characters on PostgreSQL, which cannot store U+0000 in ``text``.

The protocol lets a client send any Unicode text, NUL included (a message body, a room
name, a client id), and SQLite and MySQL/MariaDB store it as it is. PostgreSQL refuses
it (``invalid byte sequence for encoding "UTF8": 0x00``), which would fail the whole
group-commit batch holding it. So every ``text`` and ``varchar`` value crosses the
asyncpg connection through a codec that escapes NUL reversibly, with the
private-use character U+E000 as the escape:

* U+E000 is stored as U+E000 U+E000, and NUL as U+E000 U+E001;
* reading undoes both; a value without either character passes untouched (one
  ``in`` test each way).

Equality and uniqueness are exact (the escape is injective) and bound parameters go
through the same codec, so a ``WHERE`` on a value with NUL finds it. A ``LIKE``
pattern is escaped the same way and finds what it should; it can also match across
an escape, but only when the pattern or the text holds the private-use characters
U+E000 or U+E001, which no script uses (no text can be escaped into an alphabet
smaller than its own and keep substring matching exact). The full-text index reads
the stored form and turns U+E000 U+E001 into a space, as the SQLite index treats NUL
as a separator.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

ESCAPE = "\ue000"
NUL_ESCAPED = ESCAPE + "\ue001"
_ESCAPED = re.compile("\ue000([\ue000\ue001])")


def _unescape(match: re.Match[str]) -> str:
    return "\0" if match.group(1) == "\ue001" else ESCAPE


def encode(value: str) -> str:
    """The stored form of ``value``."""
    if "\0" not in value and ESCAPE not in value:
        return value
    return value.replace(ESCAPE, ESCAPE + ESCAPE).replace("\0", NUL_ESCAPED)


def decode(stored: str) -> str:
    """The value of a stored form (the inverse of :func:`encode`)."""
    if ESCAPE not in stored:
        return stored
    return _ESCAPED.sub(_unescape, stored)


async def _set_codecs(connection: Any) -> None:
    for typename in ("text", "varchar"):
        await connection.set_type_codec(
            typename, schema="pg_catalog", encoder=encode, decoder=decode, format="text"
        )


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.run_async(_set_codecs)


def install(engine: AsyncEngine) -> None:
    """Give every new connection of ``engine`` (asyncpg) the escaping codecs."""
    event.listen(engine.sync_engine, "connect", _on_connect)
