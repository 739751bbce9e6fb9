"""The clients of the chaos tests (``test_chaos.py``) and how their results are counted.

A :class:`Peer` is one user's connection that behaves as the protocol asks of a
client (docs/protocol.md §4): it keeps every ``msg`` event it receives, and when its
connection ends (a killed gateway, ``closed`` with ``resync``) it connects again
through the cluster's one client URL, authenticates with its token and recovers:
``convs`` tells each conversation's ``last_seq``, ``history {after}`` returns what it
missed. Its sends retry with the same ``cid`` until one is acknowledged.

:class:`Tally` holds what the server acknowledged; :func:`account` compares it with
what is stored and what each peer ended up with, and gives the line every test prints:
``acked=N lost=N duplicated=N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from imserver.client import Client, ClientError, ConnectFailed, ConnectionClosed

PASSWORD = "correct horse battery"
RETRYABLE = {"unavailable", "internal", "timeout", "rate_limited", "overloaded"}
"""Error codes after which a client sends the same ``cid`` again."""
REQUEST_TIMEOUT = 10.0
RECONNECT_LIMIT = 60.0


class Peer:
    """One user's connection, with the reconnect and recovery of a real client."""

    def __init__(self, name: str, username: str, token: str, user_id: str, url: str) -> None:
        self.name = name
        self.username = username
        self.token = token
        self.user_id = user_id
        self.url = url
        """Where it reconnects: the cluster's one client URL (HAProxy)."""
        self.client: Client | None = None
        self.generation = 0
        self.live: dict[tuple[str, int], dict[str, Any]] = {}
        """Messages received as live ``msg`` events."""
        self.synced: dict[tuple[str, int], dict[str, Any]] = {}
        """Messages first had through ``history`` after a reconnect."""
        self.sent: dict[tuple[str, int], str] = {}
        """Its own messages, by their acks (a session gets no event of its own sends)."""
        self.conflicts = 0
        """A (conv, seq) received twice with different content: a duplicate a client's
        de-duplication by (conv, seq) would hide, so it is counted."""
        self.reconnects = 0
        self.retries = 0
        """Requests that failed in a way a client retries, and were sent again."""
        self.closed_reasons: list[str | None] = []
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.follow = True
        """Reconnect by itself when the connection ends (readers); a sender reconnects
        when a send fails."""

    # --- connection

    async def open(self, target: str) -> None:
        """The first connection, to ``target`` (one gateway)."""
        self.client = await self._connect(target)
        self._start_watch()

    async def _connect(self, target: str) -> Client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_LIMIT
        while True:
            client: Client | None = None
            try:
                client = await Client.connect(target, timeout=5)
                client.request_timeout = REQUEST_TIMEOUT
                client.on_event = self._event
                await client.auth(self.token)
                return client
            except (ConnectFailed, ConnectionClosed, ClientError, TimeoutError, OSError):
                if client is not None:
                    await client.close()
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def _start_watch(self) -> None:
        if self.follow and self.client is not None:
            self._watch = asyncio.create_task(self._follow(self.client))

    async def _follow(self, client: Client) -> None:
        await client.wait_closed()
        if self.client is client:
            await self.reconnect(self.generation)

    async def reconnect(self, generation: int) -> None:
        """Connect again through the client URL and recover, unless another task has
        already done so since ``generation``."""
        async with self._lock:
            if generation != self.generation:
                return
            deadline = asyncio.get_running_loop().time() + RECONNECT_LIMIT
            while True:
                old = self.client
                if old is not None:
                    self.closed_reasons.append(old.closed_reason)
                    await old.close()
                self.client = await self._connect(self.url)
                self.generation += 1
                self.reconnects += 1
                try:
                    await self.recover()
                    break
                except (ConnectionClosed, TimeoutError, ClientError) as exc:
                    # The new connection closed again while it recovered (a gateway
                    # that resyncs its sessions when its own Redis connection comes
                    # back closes those made during the outage too), or the recovery
                    # was refused for a while: start over, as a client does.
                    retryable = not isinstance(exc, ClientError) or exc.code in RETRYABLE
                    if not retryable or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            self._start_watch()

    async def close(self) -> None:
        self.follow = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.client is not None:
            await self.client.close()

    # --- messages

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("op") == "msg":
            self._keep(self.live, event)

    def _keep(self, into: dict[tuple[str, int], dict[str, Any]], message: dict[str, Any]) -> None:
        key = (message["conv"], message["seq"])
        seen = self.live.get(key) or self.synced.get(key)
        if seen is not None:
            if (seen.get("cid"), seen.get("from")) != (message.get("cid"), message.get("from")):
                self.conflicts += 1
            return
        into[key] = message

    def seqs(self, conv: str) -> set[int]:
        """The seqs of ``conv`` this peer has: received, synced or sent itself."""
        have = itertools.chain(self.live, self.synced, self.sent)
        return {seq for (c, seq) in have if c == conv}

    async def recover(self) -> None:
        """``convs``, then ``history {after}`` of every conversation from the first
        seq this peer does not have (docs/protocol.md §4, guarantee 4)."""
        assert self.client is not None
        for conv in await self.client.convs():
            last = int(conv["last_seq"])
            have = self.seqs(conv["conv"])
            after = 0
            while after + 1 in have:
                after += 1
            while after < last:
                page = await self.client.history(conv["conv"], after=after, limit=200)
                for message in page["messages"]:
                    self._keep(self.synced, {**message, "conv": conv["conv"]})
                if not page["messages"]:
                    break
                after = page["messages"][-1]["seq"]

    async def request(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``op``, retried over reconnects while the failure is one a client retries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_LIMIT
        while True:
            generation, client = self.generation, self.client
            assert client is not None
            try:
                return await client.request(op, fields)
            except ClientError as exc:
                if exc.code not in RETRYABLE or loop.time() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.2)
            except (ConnectionClosed, TimeoutError):
                if loop.time() > deadline:
                    raise
                self.retries += 1
                await self.reconnect(generation)

    async def send(self, conv: str, cid: str, tally: Tally) -> dict[str, Any]:
        """Send until acknowledged, always with ``cid``; the ack goes into ``tally``."""
        body = f"{cid} from {self.name}"
        data = await self.request("send", {"conv": conv, "cid": cid, "type": "text", "body": body})
        tally.acked(conv, self.user_id, cid, int(data["seq"]), bool(data.get("dup")))
        self.sent[(conv, int(data["seq"]))] = cid
        return data


@dataclass
class Tally:
    """What the server acknowledged: (conv, sender, cid) -> seq."""

    acks: dict[tuple[str, str, str], int] = field(default_factory=dict)
    changed: int = 0
    """A cid acknowledged twice with different seqs (a resend stored again)."""
    resent: int = 0
    """Acks with ``dup: true``: a resend of a message the server had stored already."""

    def acked(self, conv: str, sender: str, cid: str, seq: int, dup: bool = False) -> None:
        key = (conv, sender, cid)
        self.resent += dup
        if key in self.acks and self.acks[key] != seq:
            self.changed += 1
        self.acks.setdefault(key, seq)

    def __len__(self) -> int:
        return len(self.acks)


@dataclass
class Account:
    """The counts a chaos test prints and asserts."""

    acked: int
    lost: int
    """Acknowledged messages missing from the stored history, or from a member's view."""
    duplicated: int
    """Messages stored more than once for one cid, or one (conv, seq) seen with two contents."""
    gaps: int
    """Seqs missing between 1 and a conversation's last seq."""
    details: list[str]

    def line(self, **extra: object) -> str:
        more = "".join(f" {key}={value}" for key, value in extra.items())
        return f"acked={self.acked} lost={self.lost} duplicated={self.duplicated}{more}"


async def stored(reader: Client, conv: str) -> list[dict[str, Any]]:
    """Every message of ``conv``, by ``history`` pages."""
    messages: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await reader.history(conv, after=after, limit=200)
        messages.extend(page["messages"])
        if not page["has_more"] or not page["messages"]:
            return messages
        after = page["messages"][-1]["seq"]


async def account(tally: Tally, members: dict[str, Sequence[Peer]]) -> Account:
    """Compare the acknowledgements with the stored history of each conv of ``members``
    (read by its first member) and with what each of its members has."""
    lost = duplicated = gaps = 0
    details: list[str] = []
    peers = {id(peer): peer for group in members.values() for peer in group}
    duplicated += sum(peer.conflicts for peer in peers.values())
    for conv, group in members.items():
        reader = group[0].client
        assert reader is not None
        messages = await stored(reader, conv)
        seqs = [m["seq"] for m in messages]
        expected = list(range(1, len(seqs) + 1))
        if seqs != expected:
            gaps += len(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
            details.append(f"{conv}: seqs not 1..N: {seqs[:20]}...")
        by_cid: dict[tuple[str, str], list[int]] = {}
        for message in messages:
            by_cid.setdefault((message["from"], message["cid"]), []).append(message["seq"])
        for (sender, cid), stored_seqs in by_cid.items():
            if len(stored_seqs) > 1:
                duplicated += len(stored_seqs) - 1
                details.append(f"{conv}: cid {cid} of {sender} stored at {stored_seqs}")
        for (c, sender, cid), seq in tally.acks.items():
            if c != conv:
                continue
            if seq not in by_cid.get((sender, cid), []):
                lost += 1
                details.append(f"{conv}: acked {cid} at seq {seq} is not stored there")
        acked_seqs = {seq for (c, _s, _cid), seq in tally.acks.items() if c == conv}
        for peer in group:
            missing = acked_seqs - peer.seqs(conv)
            if missing:
                lost += len(missing)
                details.append(f"{peer.name} lacks {conv} seqs {sorted(missing)[:20]}")
    duplicated += tally.changed
    return Account(len(tally), lost, duplicated, gaps, details)
