"""Message-service migrations over rows written by earlier revisions.

``message_0003`` rewrites ``meta`` values that one codec cannot encode (stored
before values were checked on arrival), so that reading those messages works in
both codecs again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec
from alembic import command
from message_helpers import Directory

from imserver.protocol import ops
from imserver.protocol.codec import Codec, EncodedEvent
from imserver.protocol.events import Reply
from imserver.services.caller import Caller
from imserver.services.message.service import MIGRATIONS, open_message_service
from imserver.storage.bus import MemoryLiveBus
from imserver.storage.sql import alembic_config, sqlite_url
from imserver.utils.ids import LoginId, UserId


def nested(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


DEEP_40 = nested(40, 7)
STORED = {
    1: '{"n":18446744073709551616,"ok":[1,-9223372036854775809]}',
    2: msgspec.json.encode({"deep": DEEP_40}).decode(),
    3: '{"file":"f1","w":640}',
    4: "not json",
    5: None,
}
EXPECTED = {
    1: {"n": "18446744073709551616", "ok": [1, "-9223372036854775809"]},
    # meta is level 1, so the list at level 33 becomes JSON text inside level 32.
    2: {"deep": nested(31, msgspec.json.encode(nested(9, 7)).decode())},
    3: {"file": "f1", "w": 640},
    4: {"raw": "not json"},
    5: None,
}


async def test_meta_outside_the_value_model_is_rewritten_and_reads_in_both_codecs(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path, "message")
    command.upgrade(alembic_config(url, MIGRATIONS), "message_0002")
    with sqlite3.connect(tmp_path / "message.db") as db:
        db.executemany(
            "INSERT INTO messages (conv, seq, sender, ts, type, body, cid, meta) "
            "VALUES ('d:ua:ub', ?, 'ua', 1, 'custom', '', ?, ?)",
            [(seq, f"c{seq}", meta) for seq, meta in STORED.items()],
        )
    svc = await open_message_service(url, bus=MemoryLiveBus(), users=Directory("ua", "ub"))
    try:
        caller = Caller(UserId("ub"), LoginId("l"))
        page = await svc.history(caller, ops.History(conv="d:ua:ub", after=0))
        assert {m.seq: m.meta for m in page.messages} == EXPECTED
        reply = EncodedEvent(Reply(rid="r", ok=True, data=page))
        for codec in (Codec.JSON, Codec.MSGPACK):
            reply.for_codec(codec)  # raised OverflowError in MessagePack before
    finally:
        await svc.close()
