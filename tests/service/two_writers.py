"""One of the message-service processes of ``test_two_writers.py``.

``python two_writers.py URL WORKER COUNT [MODE]``: opens the message service on the
database at URL, prints ``ready``, waits for a line on stdin, then sends COUNT
messages of its own (client ids ``w<WORKER>-<i>``) into the shared conversations,
interleaved with sends of client ids both workers use (``both-<i>``, the same
sender, so one of the two is a resend of the other). An answer is
``[conv, sender, cid, seq, dup]`` (``[conv, sender, cid, null, error code]`` for a
failed send).

MODE ``burst`` (the default) sends everything at once and prints one JSON line of
every answer. MODE ``stream`` keeps :data:`IN_FLIGHT` sends outstanding, as a busy
gateway does, prints each answer on its own line the moment it is acked (so a test
that kills the process knows exactly what was acked before), and ends with
``done``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from message_helpers import Directory, Files, Rooms, caller, send

from imserver.protocol import ops
from imserver.services.message.api import MessageService
from imserver.services.message.service import open_message_service
from imserver.storage.bus import MemoryLiveBus

CONVS = ("d:ua:ub", "r:r1")
SENDERS = ("ua", "ub")
IN_FLIGHT = 16


def _answer(write: tuple[str, str, str], answer: object) -> list[object]:
    conv, sender, cid = write
    if isinstance(answer, ops.SendData):
        return [conv, sender, cid, answer.seq, answer.dup]
    return [conv, sender, cid, None, getattr(answer, "code", repr(answer))]


async def _stream(svc: MessageService, writes: list[tuple[str, str, str]]) -> None:
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(write: tuple[str, str, str]) -> None:
        conv, sender, cid = write
        async with slots:
            try:
                answer: object = await svc.send(caller(sender), send(conv, cid, f"{cid} body"))
            except Exception as exc:
                answer = exc
        print(json.dumps(_answer(write, answer)), flush=True)

    await asyncio.gather(*(one(write) for write in writes))
    print("done", flush=True)


async def main(url: str, worker: int, count: int, mode: str) -> None:
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
        if mode == "stream":
            await _stream(svc, writes)
            return
        answers = await asyncio.gather(
            *(svc.send(caller(s), send(c, cid, f"{cid} body")) for c, s, cid in writes),
            return_exceptions=True,
        )
        out = [_answer(write, a) for write, a in zip(writes, answers, strict=True)]
        print(json.dumps(out), flush=True)
    finally:
        await svc.close()


if __name__ == "__main__":
    mode = sys.argv[4] if len(sys.argv) > 4 else "burst"
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), mode))
