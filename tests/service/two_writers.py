"""One of the two message-service processes of ``test_two_writers.py``.

``python two_writers.py URL WORKER COUNT``: opens the message service on the
database at URL, prints ``ready``, waits for a line on stdin, then sends COUNT
messages of its own (client ids ``w<WORKER>-<i>``) into the shared conversations,
interleaved with sends of client ids both workers use (``both-<i>``, the same
sender, so one of the two is a resend of the other), all at once, and prints one
JSON line: every answer, ``[conv, sender, cid, seq, dup]`` (``[conv, sender, cid,
null, error code]`` for a failed send).
"""

from __future__ import annotations

import asyncio
import json
import sys

from message_helpers import Directory, Files, Rooms, caller, send

from imserver.protocol import ops
from imserver.services.message.service import open_message_service
from imserver.storage.bus import MemoryLiveBus

CONVS = ("d:ua:ub", "r:r1")
SENDERS = ("ua", "ub")


async def main(url: str, worker: int, count: int) -> None:
    rooms = Rooms()
    rooms.add("r1", "Room", "ua", "ub")
    # Small batches: many commits of each process, taking turns on the counters.
    svc = await open_message_service(
        url,
        bus=MemoryLiveBus(),
        users=Directory("ua", "ub"),
        rooms=rooms,
        files=Files(),
        batch_max=16,
    )
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        writes = []
        for i in range(count):
            conv, sender = CONVS[i % 2], SENDERS[(i // 2) % 2]
            writes.append((conv, sender, f"w{worker}-{i}"))
            if i % 5 == 0:
                writes.append((conv, "ua", f"both-{i}"))
        answers = await asyncio.gather(
            *(svc.send(caller(s), send(c, cid, f"{cid} body")) for c, s, cid in writes),
            return_exceptions=True,
        )
        out = [
            [c, s, cid, a.seq, a.dup]
            if isinstance(a, ops.SendData)
            else [c, s, cid, None, getattr(a, "code", repr(a))]
            for (c, s, cid), a in zip(writes, answers, strict=True)
        ]
        print(json.dumps(out), flush=True)
    finally:
        await svc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
