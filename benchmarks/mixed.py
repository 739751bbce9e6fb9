"""Scenario ``mixed``: a realistic blend of DMs, room messages, typing, read receipts
and history pages from many connected users.

Setup (over HTTP, before any WebSocket connects, so it fans out to nobody):
``--users`` accounts (cheap argon2), ``--rooms`` public rooms whose sizes are drawn
from ``--room-size`` (every user is in at least one room; the owner creates each room
with half of its members, the others ``room.join``), and direct conversations between
each user and ``--dm-peers`` neighbours on a ring.

Then every user connects over WebSocket from ``--procs`` worker processes (a lean
client: :class:`_Conn`, an asyncio protocol that decodes only the fields it uses) and
runs ops at ``--rate`` / ``--users`` ops/s each (fixed interval, random phase),
picking each op from ``--mix`` (default 50% DM send, 20% room send, 10% typing,
10% read receipt up to the latest seq the user has seen in that conversation, 10%
history page of ``--history-limit``). Every op carries a ``rid``; its latency runs
from its *scheduled* time to its reply (open loop: a server that falls behind shows
it). A read with nothing seen yet in any conversation becomes a history page.

Measured over the interval: per op type ops/s (successful replies by arrival) and
p50/p99/p99.9 latency (of successful replies), error replies/s counted apart (see
:class:`OpTally`); events delivered/s (``msg``, ``receipt``, ``typing``, ``presence``) and
``msg`` delivery latency (from the send's scheduled time in ``meta.t``); server CPU
(and per op), client CPU, server RSS.

Verified over the whole run: no error replies (counted by code); every op answered;
every acked DM and room message delivered to each of the conversation's other members
(all online), counted per receiver and conversation; ``msg`` events in ascending seq
per conversation per receiver.

JSON (``benchmarks/results/mixed-<stamp>.json``), the keys the suite reads::

    "results": {
      "ops_per_s", "error_replies_per_s", "server_pct", "server_us_per_op",
      "events_per_s",
      "by_op": {"dm"|"room"|"typing"|"read"|"history":
                {"ops_per_s", "errors_per_s", "p50_ms", "p99_ms", "p999_ms"}},
      "delivery_latency": {...latency_summary...}, "events_by_kind": {kind: per_s},
      "clients_pct", "machine_pct", "steal_pct", "memory": {"rss_mib", "peak_rss_mib"}
    }
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import heapq
import os
import random
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec

from benchmarks import harness
from benchmarks.harness import Timeline
from benchmarks.wsrecv import client_frame, take_frames, take_upgrade
from imserver.client import Client, HttpClient

SCENARIO: Final = "mixed"
MIB: Final = 1024 * 1024
OPS: Final = ("dm", "room", "typing", "read", "history")
CONNECT_CONCURRENCY: Final = 32
TICK_MIN_S: Final = 0.001
TICK_MAX_S: Final = 0.005

SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {
        "rate_per_s": 1e9,
        "rate_burst": 1_000_000,
        "send_queue_bytes": 64 * MIB,
        "heartbeat": 600,
    },
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1},
}
"""The server configuration of this scenario (``--set`` adds to it)."""


def default_procs() -> int:
    """Worker processes: one per core, at least 2."""
    return max(2, os.cpu_count() or 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mixed`` sub-command's options."""
    parser.add_argument("--users", type=int, default=200, help="connected users (default 200)")
    parser.add_argument("--rooms", type=int, default=10, help="rooms (default 10)")
    parser.add_argument(
        "--room-size", default="20-50", help="members per room, MIN-MAX (default 20-50)"
    )
    parser.add_argument(
        "--dm-peers", type=int, default=4, help="direct conversations per user (default 4)"
    )
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="total ops/s over all users (default 2000)"
    )
    parser.add_argument(
        "--mix",
        default="dm=50,room=20,typing=10,read=10,history=10",
        help="op weights (default dm=50,room=20,typing=10,read=10,history=10)",
    )
    parser.add_argument(
        "--history-limit", type=int, default=50, help="messages per history page (default 50)"
    )
    parser.add_argument(
        "--body-size", type=int, default=32, help="characters per message body (default 32)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")


# --- specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserSpec:
    index: int
    user_id: str
    token: str
    dms: tuple[str, ...]
    rooms: tuple[str, ...]


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    host: str
    port: int
    users: tuple[UserSpec, ...]
    interval_ns: int
    weights: tuple[float, ...]
    """Cumulative weights of :data:`OPS`."""
    history_limit: int
    body: str
    seed: int
    drain_timeout: float
    progress_every: float


# --- the lean WebSocket client ----------------------------------------------------------


class _Seq(msgspec.Struct):
    seq: int = 0


class _Data(msgspec.Struct):
    seq: int | None = None
    messages: list[_Seq] | None = None


class _Err(msgspec.Struct):
    code: str = "?"


class _Meta(msgspec.Struct):
    t: int | None = None


class _In(msgspec.Struct):
    op: str | None = None
    rid: str | None = None
    ok: bool | None = None
    data: _Data | None = None
    error: _Err | None = None
    conv: str | None = None
    seq: int | None = None
    meta: _Meta | None = None
    reason: str | None = None


_decode = msgspec.json.Decoder(_In).decode
_encode = msgspec.json.encode


class _Conn(asyncio.Protocol):
    """One user's WebSocket connection: upgrade, hello, auth, then requests by ``rid``
    and events, dispatched to the worker."""

    def __init__(self, worker: _Worker, user: UserSpec, host: str, port: int) -> None:
        self.worker = worker
        self.user = user
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.upgraded = False
        self.lost = False
        self.closed_reason: str | None = None
        self.pending: dict[str, tuple[int, int, str]] = {}
        """rid -> (op index, scheduled ns, conv)."""
        self.next_rid = 0
        self.seen: dict[str, int] = {}
        """conv -> the latest seq this user has seen there."""
        self.last_msg: dict[str, int] = {}
        self.received: Counter[str] = Counter()
        """conv -> ``msg`` events received."""
        self.order_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self, frame: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(_encode(frame)))

    def request(self, op_index: int, due: int, frame: dict[str, Any]) -> None:
        self.next_rid += 1
        rid = str(self.next_rid)
        frame["rid"] = rid
        self.pending[rid] = (op_index, due, frame.get("conv", ""))
        self.send(frame)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            status = take_upgrade(buf)
            if status is None:
                return
            if b" 101 " not in status:
                self._fail(f"upgrade refused: {status!r}")
                return
            self.upgraded = True
            self.send({"op": "hello", "v": 1, "client": "imserver-bench", "rid": "h"})
            self.send({"op": "auth", "token": self.user.token, "rid": "a"})
        now = time.monotonic_ns()
        for opcode, payload in take_frames(buf):
            if opcode == 0x1:
                self._frame(_decode(payload), now)
            elif opcode == 0x8:
                self.lost = True
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(client_frame(payload, 0xA))

    def _frame(self, ev: _In, now: int) -> None:
        rid = ev.rid
        if rid is not None:
            if rid == "a" or rid == "h":
                if ev.ok is False:
                    self._fail(f"{'auth' if rid == 'a' else 'hello'} refused: {ev.error}")
                elif rid == "a" and not self.ready.done():
                    self.ready.set_result(None)
                return
            entry = self.pending.pop(rid, None)
            if entry is None:
                self.worker.stray_replies += 1
                return
            self.worker.replied(self, entry, ev, now)
            return
        op = ev.op or "?"
        if op == "msg" and ev.conv is not None and ev.seq is not None:
            conv, seq = ev.conv, ev.seq
            last = self.last_msg.get(conv, 0)
            if seq <= last:
                self.order_errors += 1
            else:
                self.last_msg[conv] = seq
            if seq > self.seen.get(conv, 0):
                self.seen[conv] = seq
            self.received[conv] += 1
        elif op == "closed":
            self.closed_reason = ev.reason
        self.worker.event(op, ev, now)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(b"\x03\xe8", 0x8))
            self.transport.close()


# --- counting replies ---------------------------------------------------------------------


class OpTally:
    """One worker's replies, by op (an index into :data:`OPS`).

    Only a reply that succeeded counts as a done op and gives a latency sample; an
    error reply is counted apart, by op and code, so a server that answers errors
    quickly cannot pass for a fast one. "In the window": a reply that arrived in
    [``measure``, ``end``); a latency sample is taken for an op *scheduled* in it.
    """

    def __init__(self) -> None:
        self.measure = 0
        self.end = 0
        self.ok = [0] * len(OPS)
        self.ok_window = [0] * len(OPS)
        self.lat_ns = [array("q") for _ in OPS]
        self.errors: Counter[str] = Counter()
        """``"<op>:<code>"`` -> error replies over the whole run."""
        self.errors_window = [0] * len(OPS)

    def reply(self, op_index: int, due: int, now: int, error: str | None) -> None:
        """A reply arrived at ``now`` for an op scheduled at ``due``; ``error`` is its
        error code, None for a success."""
        in_window = self.measure <= now < self.end
        if error is not None:
            self.errors[f"{OPS[op_index]}:{error}"] += 1
            if in_window:
                self.errors_window[op_index] += 1
            return
        self.ok[op_index] += 1
        if in_window:
            self.ok_window[op_index] += 1
        if self.measure <= due < self.end:
            self.lat_ns[op_index].append(now - due)

    def answered(self) -> list[int]:
        """Replies of either kind over the whole run, by op."""
        failed = [0] * len(OPS)
        for key, n in self.errors.items():
            failed[OPS.index(key.split(":", 1)[0])] += n
        return [a + b for a, b in zip(self.ok, failed, strict=True)]


# --- the worker process -----------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """The body of a worker process: its users, the timeline, the checks."""
    harness.run_async(_Worker(conn, spec).run())


class _Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.rng = random.Random(spec.seed * 1000 + spec.worker)
        self.conns: list[_Conn] = []
        self.measure = 0
        self.end = 0
        self.issued = [0] * len(OPS)
        self.tally = OpTally()
        self.not_sent: Counter[str] = Counter()
        """``"<op>:connection_lost"`` -> ops not sent: their connection was gone."""
        self.acked_by: Counter[tuple[str, str]] = Counter()
        self.events: Counter[str] = Counter()
        self.events_window: Counter[str] = Counter()
        self.dlv_ns = array("q")
        self.read_fallback = 0
        self.stray_replies = 0
        self.cid = 0

    # --- callbacks from the connections

    def replied(self, c: _Conn, entry: tuple[int, int, str], ev: _In, now: int) -> None:
        op_index, due, conv = entry
        if not ev.ok:
            self.tally.reply(op_index, due, now, ev.error.code if ev.error is not None else "?")
            return
        self.tally.reply(op_index, due, now, None)
        data = ev.data
        if data is None:
            return
        if op_index <= 1:  # dm / room send
            self.acked_by[(conv, c.user.user_id)] += 1
            if data.seq is not None and data.seq > c.seen.get(conv, 0):
                c.seen[conv] = data.seq
        elif data.messages:
            top = max(m.seq for m in data.messages)
            if top > c.seen.get(conv, 0):
                c.seen[conv] = top

    def event(self, op: str, ev: _In, now: int) -> None:
        self.events[op] += 1
        if self.measure <= now < self.end:
            self.events_window[op] += 1
            t = ev.meta.t if op == "msg" and ev.meta is not None else None
            if t is not None and self.measure <= t < self.end:
                self.dlv_ns.append(now - t)

    # --- ops

    def run_op(self, c: _Conn, due: int) -> None:
        spec = self.spec
        r = self.rng.random()
        op = next((i for i, w in enumerate(spec.weights) if r < w), len(OPS) - 1)
        user = c.user
        frame: dict[str, Any]
        if op == 1 and not user.rooms:
            op = 0
        if op == 3:
            seen = [conv for conv in (*user.dms, *user.rooms) if c.seen.get(conv, 0) > 0]
            if not seen:
                op = 4
                self.read_fallback += 1
            else:
                conv = self.rng.choice(seen)
                self._issue(c, op, due, {"op": "read", "conv": conv, "seq": c.seen[conv]})
                return
        if op <= 1:
            conv = self.rng.choice(user.dms if op == 0 else user.rooms)
            self.cid += 1
            frame = {
                "op": "send",
                "conv": conv,
                "cid": f"m{spec.worker}.{self.cid}",
                "type": "text",
                "body": spec.body,
                "meta": {"t": due},
            }
        else:
            conv = self.rng.choice((*user.dms, *user.rooms))
            if op == 2:
                frame = {"op": "typing", "conv": conv}
            else:
                frame = {"op": "history", "conv": conv, "limit": spec.history_limit}
        self._issue(c, op, due, frame)

    def _issue(self, c: _Conn, op: int, due: int, frame: dict[str, Any]) -> None:
        if c.lost:
            self.not_sent[f"{OPS[op]}:connection_lost"] += 1
            return
        self.issued[op] += 1
        c.request(op, due, frame)

    # --- the run

    async def run(self) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(u: UserSpec) -> _Conn:
            async with sem:
                _, proto = await loop.create_connection(
                    lambda: _Conn(self, u, spec.host, spec.port), spec.host, spec.port
                )
                async with asyncio.timeout(30):
                    await proto.ready
                return proto

        self.conns = list(await asyncio.gather(*(one(u) for u in spec.users)))
        self.conn.send(("ready", {"pid": os.getpid(), "connections": len(self.conns)}))
        what, timeline = await asyncio.to_thread(self.conn.recv)
        if what != "go":
            return
        self.measure, self.end = timeline.measure, timeline.end
        self.tally.measure, self.tally.end = timeline.measure, timeline.end
        reporter = asyncio.create_task(self._progress())
        try:
            await self._schedule(timeline)
            deadline = time.monotonic() + spec.drain_timeout
            while time.monotonic() < deadline and any(  # noqa: ASYNC110
                c.pending and not c.lost for c in self.conns
            ):
                await asyncio.sleep(0.02)
            self.conn.send(("acked", dict(self.acked_by)))
            what, totals = await asyncio.to_thread(self.conn.recv)
            if what != "expect":
                return
            expected = self._expected(totals)
            deadline = time.monotonic() + spec.drain_timeout
            while time.monotonic() < deadline and any(  # noqa: ASYNC110
                c.received[conv] < n and not c.lost for (c, conv), n in expected.items()
            ):
                await asyncio.sleep(0.02)
        finally:
            reporter.cancel()
        problems = self._check(expected)
        for c in self.conns:
            c.close()
        self.conn.send(
            (
                "result",
                {
                    "worker": spec.worker,
                    "pid": os.getpid(),
                    "issued": self.issued,
                    "done": self.tally.ok,
                    "done_window": self.tally.ok_window,
                    "answered": self.tally.answered(),
                    "lat_ns": self.tally.lat_ns,
                    "errors": dict(self.tally.errors),
                    "errors_window": self.tally.errors_window,
                    "not_sent": dict(self.not_sent),
                    "events": dict(self.events),
                    "events_window": dict(self.events_window),
                    "dlv_ns": self.dlv_ns,
                    "read_fallback": self.read_fallback,
                    "problems": problems,
                    "delivered_msgs": sum(sum(c.received.values()) for c in self.conns),
                    "expected_msgs": sum(expected.values()),
                },
            )
        )

    async def _schedule(self, timeline: Timeline) -> None:
        interval = self.spec.interval_ns
        heap = [
            (timeline.start + round(self.rng.random() * interval), i)
            for i in range(len(self.conns))
        ]
        heapq.heapify(heap)
        end = timeline.end
        while True:
            now = time.monotonic_ns()
            while heap and heap[0][0] <= now:
                due, i = heapq.heappop(heap)
                if due >= end:
                    return
                self.run_op(self.conns[i], due)
                heapq.heappush(heap, (due + interval, i))
            if not heap:
                return
            delay = (heap[0][0] - time.monotonic_ns()) / 1e9
            await asyncio.sleep(min(TICK_MAX_S, max(TICK_MIN_S, delay)))

    def _expected(self, totals: dict[tuple[str, str], int]) -> dict[tuple[_Conn, str], int]:
        per_conv: Counter[str] = Counter()
        for (conv, _), n in totals.items():
            per_conv[conv] += n
        out: dict[tuple[_Conn, str], int] = {}
        for c in self.conns:
            for conv in (*c.user.dms, *c.user.rooms):
                out[(c, conv)] = per_conv[conv] - totals.get((conv, c.user.user_id), 0)
        return out

    def _check(self, expected: dict[tuple[_Conn, str], int]) -> list[str]:
        problems: list[str] = []
        unanswered = sum(len(c.pending) for c in self.conns)
        if unanswered:
            problems.append(f"{unanswered} ops never answered")
        short = [(c, conv, n) for (c, conv), n in expected.items() if c.received[conv] != n]
        if short:
            c, conv, n = short[0]
            problems.append(
                f"{len(short)} (receiver, conversation) pairs got a different number of "
                f"messages than were acked, e.g. {c.user.user_id} in {conv}: "
                f"{c.received[conv]} != {n}"
            )
        known = {conv for c in self.conns for conv in (*c.user.dms, *c.user.rooms)}
        stray = sum(n for c in self.conns for conv, n in c.received.items() if conv not in known)
        if stray:
            problems.append(f"{stray} msg events of conversations the user is not in")
        order = sum(c.order_errors for c in self.conns)
        if order:
            problems.append(f"{order} msg events out of seq order")
        lost = [c for c in self.conns if c.lost]
        if lost:
            reasons = sorted({str(c.closed_reason) for c in lost})
            problems.append(f"{len(lost)} connections lost (closed: {reasons})")
        if self.stray_replies:
            problems.append(f"{self.stray_replies} replies with an unknown rid")
        return problems

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.spec.progress_every)
            with contextlib.suppress(OSError):
                self.conn.send(
                    (
                        "progress",
                        (
                            sum(self.tally.ok),
                            sum(self.events.values()),
                            sum(self.tally.errors.values()) + sum(self.not_sent.values()),
                        ),
                    )
                )


# --- the parent -------------------------------------------------------------------------


def _parse_mix(text: str) -> tuple[float, ...]:
    weights = dict.fromkeys(OPS, 0.0)
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise SystemExit(f"--mix: expected NAME=WEIGHT with NAME in {OPS}, got {part!r}")
        weights[name] = float(val)
    total = sum(weights.values())
    if total <= 0:
        raise SystemExit("--mix: the weights must add up to more than 0")
    cum: list[float] = []
    acc = 0.0
    for name in OPS:
        acc += weights[name] / total
        cum.append(acc)
    cum[-1] = 1.0
    return tuple(cum)


def _room_plan(users: int, rooms: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    """Member indices of each room: user i is in room i % rooms, plus random others."""
    plan: list[list[int]] = [[] for _ in range(rooms)]
    for i in range(users):
        plan[i % rooms].append(i)
    for members in plan:
        size = min(users, rng.randint(lo, hi))
        have = set(members)
        others = [i for i in range(users) if i not in have]
        rng.shuffle(others)
        members.extend(others[: max(0, size - len(members))])
    return plan


async def _setup(
    http_url: str, accounts: Sequence[harness.Account], plan: list[list[int]]
) -> list[str]:
    """Create the rooms (owner + half the members at once, the rest join); their convs."""
    convs: list[str] = []
    sem = asyncio.Semaphore(16)
    async with HttpClient(http_url) as http:
        for n, members in enumerate(plan):
            owner = accounts[members[0]]
            half = len(members) // 2
            first = [accounts[i].user_id for i in members[1:half]]
            room = (
                await http.request(
                    "room.create",
                    token=owner.token,
                    name=f"mixed room {n}",
                    public=True,
                    members=first,
                )
            )["room"]

            async def join(i: int, room_id: str = str(room["id"])) -> None:
                async with sem:
                    await http.request("room.join", token=accounts[i].token, room=room_id)

            await asyncio.gather(*(join(i) for i in members[half:]))
            info = (await http.request("room.get", token=owner.token, room=room["id"]))["room"]
            if info["members"] != len(members):
                raise RuntimeError(f"room {n} has {info['members']} members, not {len(members)}")
            convs.append(str(room["conv"]))
    return convs


def run(args: argparse.Namespace) -> int:
    """Run the scenario; returns the exit status (0 = ran and verified)."""
    lo, _, hi = str(args.room_size).partition("-")
    try:
        size_lo, size_hi = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit("--room-size takes MIN-MAX, e.g. 20-50") from None
    if args.users < 3 or args.rate <= 0 or args.procs < 1 or args.duration <= 0:
        raise SystemExit("--users >= 3; --rate, --procs and --duration must be positive")
    if args.transport != "ws" or args.codec != "json":
        raise SystemExit("mixed runs over WebSocket with JSON only")
    weights = _parse_mix(args.mix)
    peers = max(1, min(args.dm_peers, args.users - 1))
    config = harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))
    stamp = harness.timestamp()
    rng = random.Random(args.seed)
    plan = _room_plan(args.users, max(0, args.rooms), size_lo, size_hi, rng)
    failures: list[str] = []

    with harness.ServerProcess(config, keep_dir=args.keep_data) as server:
        harness.console.print(
            f"[dim]server pid {server.pid} on {server.http_url}; registering {args.users} "
            f"users, creating {len(plan)} rooms ...[/dim]"
        )
        t0 = time.monotonic()
        accounts = harness.run_async(
            harness.provision_users(server.http_url, args.users, concurrency=16)
        )
        room_convs = harness.run_async(_setup(server.http_url, accounts, plan))
        setup_s = time.monotonic() - t0
        rooms_of: list[list[str]] = [[] for _ in accounts]
        for conv, members in zip(room_convs, plan, strict=True):
            for i in members:
                rooms_of[i].append(conv)
        offsets = [d for k in range(1, peers // 2 + 2) for d in (k, -k)][:peers]
        users = []
        for i, a in enumerate(accounts):
            dms = sorted(
                {
                    Client.direct_conv(a.user_id, accounts[(i + d) % len(accounts)].user_id)
                    for d in offsets
                    if (i + d) % len(accounts) != i
                }
            )
            users.append(UserSpec(i, a.user_id, a.token, tuple(dms), tuple(rooms_of[i])))
        procs = max(1, min(args.procs, len(users)))
        specs = [
            WorkerSpec(
                worker=w,
                host=harness.HOST,
                port=server.http_port,
                users=tuple(users[w::procs]),
                interval_ns=round(1e9 * args.users / args.rate),
                weights=weights,
                history_limit=args.history_limit,
                body="x" * args.body_size,
                seed=args.seed,
                drain_timeout=args.drain_timeout,
                progress_every=0.25,
            )
            for w in range(procs)
        ]
        pool = harness.WorkerPool(worker_main, specs)
        pool.start()
        try:
            pool.gather("ready", timeout=120)
            measured = _drive(args, server, pool, stamp)
        except BaseException:
            pool.send_all(("stop", None))
            pool.join(5)
            raise
        pool.join()
        memory = harness.memory_of(server.pid)
        exit_code = server.stop()
        if exit_code != 0:
            failures.append(f"the server exited with code {exit_code}\n{server.logs()}")

    res: list[dict[str, Any]] = measured["results"]
    a, b = measured["snapshots"]
    window = args.duration
    done_w = [sum(r["done_window"][k] for r in res) for k in range(len(OPS))]
    errors_w = [sum(r["errors_window"][k] for r in res) for k in range(len(OPS))]
    ops_w = sum(done_w)
    server_cpu_s = b.procs[server.pid] - a.procs[server.pid]
    events_w: Counter[str] = Counter()
    events_all: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    not_sent: Counter[str] = Counter()
    for r in res:
        events_w.update(r["events_window"])
        events_all.update(r["events"])
        errors.update(r["errors"])
        not_sent.update(r["not_sent"])
    by_op: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(OPS):
        lat = harness.latency_summary(x for r in res for x in r["lat_ns"][k])
        by_op[name] = {
            "ops_per_s": done_w[k] / window,
            "errors_per_s": errors_w[k] / window,
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
            "p999_ms": lat.get("p99.9_ms"),
            "count": lat.get("count"),
        }
    dlv = harness.latency_summary(x for r in res for x in r["dlv_ns"])
    client_pids = [r["pid"] for r in res]
    results: dict[str, Any] = {
        "measured_s": window,
        "ops_per_s": ops_w / window,
        "error_replies_per_s": sum(errors_w) / window,
        "by_op": by_op,
        "events_per_s": sum(events_w.values()) / window,
        "events_by_kind": {k: v / window for k, v in sorted(events_w.items())},
        "delivery_latency": dlv,
        "server_pct": harness.cpu_percent(a, b, [server.pid]),
        "server_us_per_op": 1e6 * server_cpu_s / ops_w if ops_w else None,
        "server_threads_pct": harness.thread_percents(a, b),
        "clients_pct": harness.cpu_percent(a, b, client_pids),
        "machine_pct": harness.machine_percent(a, b),
        "steal_pct": harness.steal_percent(a, b),
        "memory": memory,
        "errors": dict(errors),
        "not_sent": dict(not_sent),
        "read_fallback": sum(r["read_fallback"] for r in res),
        "totals": {
            "issued": [sum(r["issued"][k] for r in res) for k in range(len(OPS))],
            "answered": [sum(r["answered"][k] for r in res) for k in range(len(OPS))],
            "ok": [sum(r["done"][k] for r in res) for k in range(len(OPS))],
            "msgs_delivered": sum(r["delivered_msgs"] for r in res),
            "msgs_expected": sum(r["expected_msgs"] for r in res),
            "events": dict(events_all),
        },
    }
    if errors:
        failures.append(f"error replies: {dict(errors)}")
    if not_sent:
        failures.append(f"ops not sent, their connection lost: {dict(not_sent)}")
    for r in res:
        failures.extend(f"worker {r['worker']}: {p}" for p in r["problems"])

    report = harness.Report(title=f"mixed: DMs, rooms, typing, receipts, history ({stamp})")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    report.add(
        "ops/s answered ok / error replies/s",
        f"{results['ops_per_s']:,.0f} (target {args.rate:,.0f}) / "
        f"{results['error_replies_per_s']:,.0f}",
    )
    for name in OPS:
        o = by_op[name]
        report.add(
            f"  {name}: ops/s, p50 / p99 / p99.9 (ms)",
            f"{o['ops_per_s']:,.0f}, {ms(o['p50_ms'])} / {ms(o['p99_ms'])} / {ms(o['p999_ms'])}",
        )
    report.add(
        "events delivered/s",
        f"{results['events_per_s']:,.0f} ("
        + ", ".join(f"{k} {v:,.0f}" for k, v in results["events_by_kind"].items())
        + ")",
    )
    report.add(
        "msg delivery p50 / p99 / p99.9 (ms)",
        " / ".join(ms(dlv.get(k)) for k in ("p50_ms", "p99_ms", "p99.9_ms")),
    )
    per_op = results["server_us_per_op"]
    report.add(
        "server CPU, per op",
        f"{results['server_pct']:.0f}% of a core, " + (f"{per_op:.1f} µs" if per_op else "-"),
    )
    report.add(
        "client CPU / machine busy",
        f"{results['clients_pct']:.0f}% of a core ({len(client_pids)} procs) / "
        f"{results['machine_pct']:.0f}% of {os.cpu_count()} cores "
        f"(host steal {results['steal_pct']:.1f}%)",
    )
    report.add("server RSS / peak (MiB)", f"{memory['rss_mib']:.0f} / {memory['peak_rss_mib']:.0f}")
    tot = results["totals"]
    report.add(
        "whole run: ops answered / msgs delivered",
        f"{sum(tot['answered']):,} ({sum(tot['ok']):,} ok) / {tot['msgs_delivered']:,} "
        f"(expected {tot['msgs_expected']:,})",
    )
    report.add("verification", "OK" if not failures else f"FAILED ({len(failures)})")
    report.failures.extend(failures)
    sizes = [len(m) for m in plan]
    report.config = [
        ("users / procs", f"{args.users} / {procs}"),
        (
            "rooms",
            f"{len(plan)} of {min(sizes, default=0)}-{max(sizes, default=0)} members "
            f"({sum(sizes)} memberships)",
        ),
        ("DM peers per user", str(peers)),
        ("rate / mix", f"{args.rate:,.0f} ops/s / {args.mix}"),
        ("history limit / body", f"{args.history_limit} / {args.body_size} chars"),
        ("warmup / measured", f"{args.warmup:g} s / {args.duration:g} s"),
        ("setup", f"{setup_s:.1f} s"),
    ]
    if results["read_fallback"]:
        report.notes.append(
            f"{results['read_fallback']} reads became history pages (nothing seen yet)"
        )
    out = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "server": {"config": config, "exit_code": exit_code},
        "results": results,
        "verification": {"ok": not failures, "failures": failures},
        "profile": measured["profile"],
    }
    path = harness.write_results(SCENARIO, out, stamp)
    prof = measured["profile"]
    if prof and "error" in prof:
        report.notes.append(f"py-spy failed: {prof['error']}")
        prof = None
    harness.print_report(report, prof)
    harness.console.print(f"results: {path}")
    return 1 if failures else 0


def _drive(
    args: argparse.Namespace, server: harness.ServerProcess, pool: harness.WorkerPool, stamp: str
) -> dict[str, Any]:
    """Start the timeline, take CPU snapshots at the interval's edges, relay the acked
    counts for the delivery check, collect the results."""
    now = time.monotonic_ns()
    start = now + 300_000_000
    measure = start + round(args.warmup * 1e9)
    end = measure + round(args.duration * 1e9)
    pool.send_all(("go", Timeline(start, measure, end)))
    pids = [server.pid, *pool.pids]
    snap_a: harness.CpuSnapshot | None = None
    snap_b: harness.CpuSnapshot | None = None
    profiler: harness.PySpy | None = None
    acked: dict[int, dict[tuple[str, str], int]] = {}
    results: dict[int, dict[str, Any]] = {}
    progress: dict[int, tuple[int, int, int]] = {}
    n = len(pool.procs)
    deadline = end / 1e9 + 2 * args.drain_timeout + 60.0
    with harness.LiveStatus((end - now) / 1e9 + 1.0, enabled=not args.no_progress) as status:
        while len(results) < n:
            t = time.monotonic_ns()
            if t / 1e9 > deadline:
                raise TimeoutError("workers did not report their results")
            edge = measure if snap_a is None else end if snap_b is None else None
            timeout = 0.1 if edge is None else max(0.0, min(0.1, (edge - t) / 1e9))
            for i, (what, data) in pool.poll(timeout):
                if what == "progress":
                    progress[i] = data
                elif what == "acked":
                    acked[i] = data
                    if len(acked) == n:
                        totals: Counter[tuple[str, str]] = Counter()
                        for d in acked.values():
                            totals.update(d)
                        pool.send_all(("expect", dict(totals)))
                elif what == "result":
                    results[i] = data
                elif what == "error" or (what == "exit" and i not in results):
                    raise RuntimeError(f"worker {i} failed:\n{data}")
            t = time.monotonic_ns()
            if snap_a is None and t >= measure:
                snap_a = harness.take_snapshot(pids, threads_of=server.pid)
                if args.profile:
                    out = harness.RESULTS_DIR / f"{SCENARIO}-{stamp}-server.speedscope.json"
                    profiler = harness.PySpy(server.pid, args.duration, out)
                    profiler.start()
            # Not elif: one slow turn of this loop can pass both marks.
            if snap_a is not None and snap_b is None and t >= end:
                snap_b = harness.take_snapshot(pids, threads_of=server.pid)
            phase = "warmup" if t < measure else "measure" if t < end else "drain"
            ops = sum(p[0] for p in progress.values())
            events = sum(p[1] for p in progress.values())
            errs = sum(p[2] for p in progress.values())
            status.update(
                phase,
                (t - now) / 1e9,
                f"ops {ops:,}  events {events:,}" + (f"  ERRORS {errs:,}" if errs else ""),
            )
    assert snap_a is not None and snap_b is not None
    profile = profiler.summary() if profiler is not None else None
    return {
        "results": [results[i] for i in sorted(results)],
        "snapshots": (snap_a, snap_b),
        "profile": profile,
    }


__all__ = [
    "SCENARIO",
    "OpTally",
    "UserSpec",
    "WorkerSpec",
    "add_arguments",
    "default_procs",
    "run",
]
