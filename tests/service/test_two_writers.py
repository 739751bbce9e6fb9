"""Two message services, two processes, one database server: seqs stay gap-free and
duplicate-free (``imserver.services.message.counters``).

Each process (``two_writers.py``) sends its own messages and, at the same time,
messages with client ids the other process sends too (same sender): whichever
stores such a message first, the other's send is an idempotent resend. Afterwards
every acked message is stored once, with the seq it was acked with, each
conversation's seqs are 1..N, and the two answers for a shared client id carry the
same seq, exactly one of them ``dup: false``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from databases import ServerDatabases, rows

from imserver.services.message.service import MIGRATIONS
from imserver.storage.sql import upgrade

HERE = Path(__file__).parent
COUNT = 400
"""Messages of each process's own (plus one shared client id per five)."""


async def _worker(url: str, worker: int, mode: str = "burst") -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "two_writers.py"),
        url,
        str(worker),
        str(COUNT),
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
async def test_two_processes_write_the_same_conversations(
    server: str, server_databases: ServerDatabases
) -> None:
    database = await server_databases.get(server)
    await server_databases.empty(database)
    url = database.url
    await upgrade(url, MIGRATIONS)
    workers = [await _worker(url, w) for w in (1, 2)]
    try:
        for proc in workers:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.strip() == b"ready", line
        for proc in workers:  # both start sending at the same moment
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = []
        for proc in workers:
            assert proc.stdout is not None
            outputs.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 120)))
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    stored, seqs = await _stored_gap_free(url)
    by_key = {(c, s, cid): seq for c, s, cid, seq in stored}
    # Every ack names the stored message; shared client ids were stored once, and
    # exactly one of the two sends stored it.
    answers = [answer for output in outputs for answer in output]
    failed = [answer for answer in answers if answer[3] is None]
    assert failed == [], f"{len(failed)} sends failed, e.g. {failed[:3]}"
    for conv, sender, cid, seq, _dup in answers:
        assert by_key[(conv, sender, cid)] == seq, (conv, sender, cid)
    shared = Counter((c, s, cid) for c, s, cid, _, dup in answers if not dup)
    assert all(n == 1 for n in shared.values())
    assert len(stored) == len(shared) == 2 * COUNT + COUNT // 5
    # The processes really interleaved in both conversations: each stored messages
    # between seqs the other stored.
    for conv in seqs:
        order = sorted((seq, cid) for c, _, cid, seq in stored if c == conv)
        writers = [cid.split("-")[0] for _, cid in order if not cid.startswith("both")]
        switches = sum(1 for a, b in itertools.pairwise(writers) if a != b)
        assert switches >= 2, (conv, switches)


async def _stored_gap_free(
    url: str,
) -> tuple[list[tuple[str, str, str, int]], dict[str, list[int]]]:
    """Every stored message, after checking that each (conv, sender, cid) is stored
    once and that every conversation's seqs are 1..N (no gap, no duplicate)."""
    stored = [
        (str(c), str(s), str(cid), int(seq))
        for c, s, cid, seq in await rows(url, "SELECT conv, sender, cid, seq FROM messages")
    ]
    assert len({(c, s, cid) for c, s, cid, _ in stored}) == len(stored)
    seqs: dict[str, list[int]] = defaultdict(list)
    for conv, _, _, seq in stored:
        seqs[conv].append(seq)
    for conv, found in seqs.items():
        assert sorted(found) == list(range(1, len(found) + 1)), conv
    return stored, seqs


async def _go(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None and proc.stdin is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()


async def _answers(proc: asyncio.subprocess.Process, limit: int | None = None) -> list[list]:
    """The answers a ``stream`` worker printed: all of them up to ``done``, or the
    first ``limit``."""
    assert proc.stdout is not None
    answers: list[list] = []
    while limit is None or len(answers) < limit:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, "the worker ended without done"
        if line.strip() == b"done":
            break
        answers.append(json.loads(line))
    return answers


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
async def test_an_instance_killed_mid_stream_loses_no_acked_message(
    server: str, server_databases: ServerDatabases
) -> None:
    """Two instances stream sends into the same conversations; one is killed with
    SIGKILL after a third of its acks (its transaction in flight, its row locks
    held). Its client resends everything through a new instance, as a client does
    through another gateway after a reconnect. Every message acked before the kill
    is stored with the seq it was acked with, and the resends answer it as a
    duplicate with that seq; everything is stored once, with no gap in any
    conversation; and the surviving instance's sends all succeed."""
    database = await server_databases.get(server)
    await server_databases.empty(database)
    url = database.url
    await upgrade(url, MIGRATIONS)
    survivor = await _worker(url, 1, "stream")
    victim = await _worker(url, 2, "stream")
    resender: asyncio.subprocess.Process | None = None
    try:
        for proc in (survivor, victim):
            await _go(proc)
        survivor_answers = asyncio.ensure_future(_answers(survivor))
        before_kill = await _answers(victim, limit=COUNT // 3)
        victim.kill()
        await victim.wait()
        resender = await _worker(url, 2, "stream")
        await _go(resender)
        resent = await _answers(resender)
        kept = await survivor_answers
        assert await asyncio.wait_for(survivor.wait(), 60) == 0
        assert await asyncio.wait_for(resender.wait(), 60) == 0
    finally:
        for proc in (survivor, victim, resender):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()

    stored, _ = await _stored_gap_free(url)
    by_key = {(c, s, cid): seq for c, s, cid, seq in stored}
    failed = [a for a in kept + resent if a[3] is None]
    assert failed == [], f"{len(failed)} sends failed, e.g. {failed[:3]}"
    acked_before = [a for a in before_kill if a[3] is not None]
    assert len(acked_before) >= COUNT // 4  # the kill really came mid-stream
    for conv, sender, cid, seq, _dup in acked_before + kept + resent:
        assert by_key[(conv, sender, cid)] == seq, (conv, sender, cid)
    resent_by_key = {(c, s, cid): (seq, dup) for c, s, cid, seq, dup in resent}
    for conv, sender, cid, seq, _dup in acked_before:
        assert resent_by_key[(conv, sender, cid)] == (seq, True), (conv, sender, cid)
    # Everything both clients sent is stored, once: their own messages and one copy
    # of each shared client id.
    assert len(stored) == 2 * COUNT + COUNT // 5
    print(
        f"\n{server}: acked before the kill {len(acked_before)}, "
        f"lost 0 of them, stored {len(stored)}, duplicates 0"
    )
