"""One ingest: the transaction that stores the pushes of a batch of committed
messages and moved read markers (:func:`ingest`, run by
:meth:`~imserver.services.notification.store.SqlNotificationStore.ingest`).

One transaction per batch: the decisions of every member, the new jobs and the jobs
that absorbed a message (collapse), and the provider queues' bound — so after a crash
either all of a batch's work is stored or none of it, and the catch-up stores it again
(decisions are keyed by (conv, seq, user); a message whose decisions exist is
skipped).

Collapse: a message for (user, device, conv) joins the waiting ``message`` job of the
same (user, device, conv) — ``queued`` (within the collapse delay) or ``retry-wait``
— raising its ``count`` and moving its ``seq``; its key stays the one it was created
with, so a receiver that saw an earlier attempt of that key drops a repeat.

Bound: after a batch, each provider it touched has at most ``queue_max`` waiting
jobs; the oldest waiting ones past it become ``dropped`` (visible in the trace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import Connection, Row, bindparam, func, insert, select, update

from imserver.services.message.api import CommittedMessage, ReadMoved
from imserver.services.notification.providers.base import Registration
from imserver.services.notification.rules import decide, pushes
from imserver.services.notification.schema import (
    DROPPED,
    QUEUED,
    WAITING,
    conv_settings,
    push_cursor,
    push_decisions,
    push_jobs,
    registration_from_row,
    registrations,
)
from imserver.storage.statements import chunks

CURSOR_TS = "ingested_ts"
"""The ``push_cursor`` row holding the newest message timestamp ingested."""


class IngestPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What one ingest needs besides the database."""

    messages: Sequence[CommittedMessage]
    reads: Sequence[ReadMoved]
    online: Mapping[str, tuple[str, ...]]
    """user -> devices with a live session (only users that have any)."""
    providers: frozenset[str]
    """Providers enabled now: registrations with another are ignored."""
    now: int
    collapse_ms: int
    queue_max: int
    cursor: int | None = None
    """Set the ingest cursor to this (the first start); else to the newest message."""
    dedupe: bool = True
    """Skip messages whose decisions are stored (the catch-up and the live events
    that arrived during it); live events after it are new by construction."""


class IngestResult(msgspec.Struct, kw_only=True):
    jobs: int = 0
    collapsed: int = 0
    dropped: int = 0
    messages: int = 0


def ingest(conn: Connection, plan: IngestPlan) -> IngestResult:
    """Decide and store the pushes of ``plan`` in ``conn``'s transaction (see the
    module docstring)."""
    result = IngestResult()
    now = plan.now
    msgs = [m for m in plan.messages if pushes(m.type, m.conv)]
    if msgs and plan.dedupe:
        d = push_decisions.c
        done: set[tuple[str, int]] = set()
        for conv in {m.conv for m in msgs}:
            seqs = [m.seq for m in msgs if m.conv == conv]
            done.update(
                (conv, s)
                for s in conn.execute(
                    select(d.seq).where(d.conv == conv, d.seq.in_(seqs)).distinct()
                ).scalars()
            )
        # A repeat within the run (an event delivered twice, both queued) counts once.
        kept: list[CommittedMessage] = []
        for m in msgs:
            if (m.conv, m.seq) not in done:
                done.add((m.conv, m.seq))
                kept.append(m)
        msgs = kept
    users = sorted({u for m in msgs for u in m.members} | {r.user for r in plan.reads})
    regs = _registrations_of(conn, users, plan.providers)
    settings = _settings_of(conn, {(u, m.conv) for m in msgs for u in m.members})
    outbox = _Outbox.load(conn, [u for u in users if u in regs], plan)
    touched: set[str] = set()
    decisions: list[dict[str, Any]] = []
    for m in msgs:
        result.messages += 1
        mentioned = set(m.mentions)
        for user in m.members:
            muted_until, level = settings.get((user, m.conv), (0, "all"))
            user_regs = regs.get(user, [])
            decision = decide(
                user=user,
                sender=m.sender,
                online=plan.online.get(user, ()),
                muted_until=muted_until,
                level=level,
                mentioned=user in mentioned,
                registered=bool(user_regs),
                now=now,
            )
            jobs: list[tuple[str, str, str, bool]] = []
            if decision.due:
                for reg in user_regs:
                    key, collapsed = outbox.add(m, reg)
                    jobs.append((reg.device, reg.provider, key, collapsed))
                    touched.add(reg.provider)
                    if collapsed:
                        result.collapsed += 1
                    else:
                        result.jobs += 1
            detail = msgspec.json.encode(
                {
                    "online": decision.online,
                    "muted_until": decision.muted_until,
                    "level": decision.level,
                    "mentioned": decision.mentioned,
                    "jobs": jobs,
                }
            ).decode()
            decisions.append(
                {
                    "conv": m.conv,
                    "seq": m.seq,
                    "user_id": user,
                    "due": decision.due,
                    "reason": decision.reason,
                    "detail": detail,
                    "created": now,
                }
            )
    outbox.store(conn)
    if decisions:
        conn.execute(insert(push_decisions), decisions)
    for read in plan.reads:
        for reg in regs.get(read.user, []):
            if reg.device == read.login:
                continue
            _enqueue_read(conn, read, reg, now)
            touched.add(reg.provider)
            result.jobs += 1
    for provider in touched:
        result.dropped += _bound(conn, provider, plan.queue_max, now)
    if plan.cursor is not None:
        _set_cursor(conn, plan.cursor)
    elif msgs:
        _set_cursor(conn, max(m.ts for m in msgs))
    return result


def push_key(reg: Registration, conv: str, seq: int) -> str:
    """The idempotency key of a push: ``<user>:<device>:<conv>:<first seq>``."""
    return f"{reg.user}:{reg.device}:{conv}:{seq}"


def _waiting(
    conn: Connection, reg: Registration, conv: str, kind: str
) -> Row[Any, Any, Any, Any] | None:
    """The push of ``kind`` for ``reg``'s device in ``conv`` that has not been sent yet
    (a later read folds into a waiting ``read`` push; messages fold through
    :class:`_Outbox`)."""
    j = push_jobs.c
    return conn.execute(
        select(j.id, j.key, j.count, j.seq).where(
            j.user_id == reg.user,
            j.device == reg.device,
            j.conv == conv,
            j.kind == kind,
            j.provider == reg.provider,
            j.state.in_(WAITING),
        )
    ).first()


class _Waiting(msgspec.Struct, kw_only=True):
    """A ``message`` push of one (user, device, provider, conv) not sent yet: a row
    loaded from the outbox (``id`` set) or one this ingest creates (``id`` None)."""

    id: int | None
    key: str
    seq: int
    count: int
    title: str
    body: str
    changed: bool = False


class _Outbox:
    """The ``message`` pushes one ingest creates or folds messages into, written at
    the end in two statements (an insert of the new ones, an update of the others)."""

    def __init__(self, waiting: dict[tuple[str, str, str, str], _Waiting], plan: IngestPlan):
        self._waiting = waiting
        self._plan = plan

    @classmethod
    def load(cls, conn: Connection, users: Sequence[str], plan: IngestPlan) -> _Outbox:
        """The waiting ``message`` pushes of ``users`` (every device and conversation)."""
        j = push_jobs.c
        waiting: dict[tuple[str, str, str, str], _Waiting] = {}
        for chunk in chunks(users):
            rows = conn.execute(
                select(
                    j.id,
                    j.key,
                    j.seq,
                    j.count,
                    j.title,
                    j.body,
                    j.user_id,
                    j.device,
                    j.provider,
                    j.conv,
                ).where(j.user_id.in_(chunk), j.kind == "message", j.state.in_(WAITING))
            )
            for row in rows:
                waiting[(row.user_id, row.device, row.provider, row.conv)] = _Waiting(
                    id=row.id,
                    key=row.key,
                    seq=row.seq,
                    count=row._mapping["count"],
                    title=row.title,
                    body=row.body,
                )
        return cls(waiting, plan)

    def add(self, m: CommittedMessage, reg: Registration) -> tuple[str, bool]:
        """The push of ``m`` for one device, folded into the waiting one if any: its
        key and whether it folded."""
        where = (reg.user, reg.device, reg.provider, m.conv)
        found = self._waiting.get(where)
        if found is None:
            key = push_key(reg, m.conv, m.seq)
            self._waiting[where] = _Waiting(
                id=None, key=key, seq=m.seq, count=1, title=m.sender, body=m.body
            )
            return key, False
        found.count += 1
        found.seq = max(found.seq, m.seq)
        found.title, found.body, found.changed = m.sender, m.body, True
        return found.key, True

    def store(self, conn: Connection) -> None:
        """Insert the new pushes, update the ones messages folded into."""
        now = self._plan.now
        new = [
            {
                "key": w.key,
                "kind": "message",
                "user_id": user,
                "device": device,
                "provider": provider,
                "conv": conv,
                "seq": w.seq,
                "count": w.count,
                "title": w.title,
                "body": w.body,
                "state": QUEUED,
                "attempts": 0,
                "next_at": now + self._plan.collapse_ms,
                "created": now,
                "updated": now,
            }
            for (user, device, provider, conv), w in self._waiting.items()
            if w.id is None
        ]
        if new:
            conn.execute(insert(push_jobs), new)
        folded = [
            {"b_id": w.id, "b_count": w.count, "b_seq": w.seq, "b_title": w.title, "b_body": w.body}
            for w in self._waiting.values()
            if w.id is not None and w.changed
        ]
        if folded:
            j = push_jobs.c
            conn.execute(
                update(push_jobs)
                .where(j.id == bindparam("b_id"))
                .values(
                    count=bindparam("b_count"),
                    seq=bindparam("b_seq"),
                    title=bindparam("b_title"),
                    body=bindparam("b_body"),
                    updated=now,
                ),
                folded,
            )


def _enqueue_read(conn: Connection, read: ReadMoved, reg: Registration, now: int) -> None:
    """A silent ``read`` push for one of the user's other devices (a waiting one of the
    same conversation moves to the newer seq)."""
    j = push_jobs.c
    found = _waiting(conn, reg, read.conv, "read")
    if found is not None:
        conn.execute(
            update(push_jobs)
            .where(j.id == found.id)
            .values(seq=max(found.seq, read.seq), updated=now)
        )
        return
    key = push_key(reg, read.conv, read.seq)
    exists = conn.execute(select(j.id).where(j.kind == "read", j.key == key)).first()
    if exists is not None:
        return
    conn.execute(
        insert(push_jobs).values(
            key=key,
            kind="read",
            user_id=reg.user,
            device=reg.device,
            provider=reg.provider,
            conv=read.conv,
            seq=read.seq,
            count=0,
            title="",
            body="",
            state=QUEUED,
            attempts=0,
            next_at=now,
            created=now,
            updated=now,
        )
    )


def _bound(conn: Connection, provider: str, queue_max: int, now: int) -> int:
    """Drop the oldest waiting jobs of ``provider`` past ``queue_max``."""
    j = push_jobs.c
    waiting = conn.scalar(select(func.count()).where(j.provider == provider, j.state.in_(WAITING)))
    excess = int(waiting or 0) - queue_max
    if excess <= 0:
        return 0
    oldest = (
        select(j.id)
        .where(j.provider == provider, j.state.in_(WAITING))
        .order_by(j.id)
        .limit(excess)
    )
    ids = list(conn.execute(oldest).scalars())
    for chunk in chunks(ids):
        conn.execute(update(push_jobs).where(j.id.in_(chunk)).values(state=DROPPED, updated=now))
    return len(ids)


def _set_cursor(conn: Connection, value: int) -> None:
    c = push_cursor.c
    updated = conn.execute(
        update(push_cursor).where(c.name == CURSOR_TS, c.value < value).values(value=value)
    ).rowcount
    if not updated and conn.execute(select(c.name).where(c.name == CURSOR_TS)).first() is None:
        conn.execute(insert(push_cursor).values(name=CURSOR_TS, value=value))


def _registrations_of(
    conn: Connection, users: Sequence[str], providers: frozenset[str]
) -> dict[str, list[Registration]]:
    found: dict[str, list[Registration]] = {}
    r = registrations.c
    for chunk in chunks(users):
        rows = conn.execute(
            select(registrations).where(r.user_id.in_(chunk)).order_by(r.created, r.device)
        )
        for row in rows:
            if row.provider in providers:
                found.setdefault(row.user_id, []).append(registration_from_row(row))
    return found


def _settings_of(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """(user, conv) -> (muted_until, level) of those of ``keys`` with a setting: the
    settings of the users asked (a user has few), kept where the conversation is."""
    found: dict[tuple[str, str], tuple[int, str]] = {}
    c = conv_settings.c
    for chunk in chunks(sorted({user for user, _ in keys})):
        rows = conn.execute(
            select(c.user_id, c.conv, c.muted_until, c.level).where(c.user_id.in_(chunk))
        )
        for row in rows:
            if (row.user_id, row.conv) in keys:
                found[(row.user_id, row.conv)] = (int(row.muted_until), str(row.level))
    return found
