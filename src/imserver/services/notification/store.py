"""The notification service's SQL store: registrations, settings, the outbox, the
decision log (tables in :mod:`~imserver.services.notification.schema`).

Ingest is one transaction per batch of committed messages (:meth:`ingest`): the
decisions of every member, the new jobs and the jobs that absorbed a message
(collapse), and the provider queues' bound — so after a crash either all of a batch's
work is stored or none of it, and the catch-up stores it again (decisions are keyed
by (conv, seq, user); a message whose decisions exist is skipped).

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
from sqlalchemy import Connection, and_, delete, func, insert, select, update

from imserver.protocol.models import PushAttempt, PushJob, PushRecipient, PushRegistration
from imserver.services.message.api import CommittedMessage, ReadMoved
from imserver.services.notification.providers.base import Outcome, Registration
from imserver.services.notification.rules import decide, pushes
from imserver.services.notification.schema import (
    DROPPED,
    FAILED,
    FINISHED,
    QUEUED,
    SENDING,
    WAITING,
    conv_settings,
    push_attempts,
    push_cursor,
    push_decisions,
    push_jobs,
    registrations,
)
from imserver.storage.runners import SqlStore
from imserver.storage.statements import chunks

CURSOR_TS = "ingested_ts"


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed job, as the worker sends it."""

    id: int
    key: str
    kind: str
    user: str
    device: str
    provider: str
    conv: str
    seq: int
    count: int
    title: str
    body: str
    attempts: int


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


def _reg(row: Any) -> Registration:
    return Registration(
        user=row.user_id,
        device=row.device,
        provider=row.provider,
        target=msgspec.json.decode(row.target),
        created=row.created,
    )


class SqlNotificationStore(SqlStore):
    """All of the notification service's persistent state in one SQL database."""

    name = "notification database"

    # --- registrations and settings ---------------------------------------------

    async def register(self, reg: Registration) -> None:
        """Store (or replace) a device's registration with a provider."""

        def run(conn: Connection) -> None:
            r = registrations.c
            conn.execute(
                delete(registrations).where(
                    r.user_id == reg.user, r.device == reg.device, r.provider == reg.provider
                )
            )
            conn.execute(
                insert(registrations).values(
                    user_id=reg.user,
                    device=reg.device,
                    provider=reg.provider,
                    target=msgspec.json.encode(reg.target).decode(),
                    created=reg.created,
                )
            )

        await self._write(run)

    async def unregister(self, user: str, device: str | None, provider: str | None) -> int:
        """Delete registrations of ``user`` (of ``device``, of ``provider`` when given);
        the number deleted."""

        def run(conn: Connection) -> int:
            r = registrations.c
            cond = [r.user_id == user]
            if device is not None:
                cond.append(r.device == device)
            if provider is not None:
                cond.append(r.provider == provider)
            return conn.execute(delete(registrations).where(*cond)).rowcount or 0

        return await self._write(run)

    async def registered_users(self) -> set[str]:
        """Every user with at least one registration."""

        def run(conn: Connection) -> set[str]:
            return set(conn.execute(select(registrations.c.user_id).distinct()).scalars())

        return await self._read(run)

    async def forget_device(self, device: str) -> None:
        """Delete every registration of a device (a login session that ended)."""

        def run(conn: Connection) -> None:
            conn.execute(delete(registrations).where(registrations.c.device == device))

        await self._write(run)

    async def registrations(self, user: str) -> list[PushRegistration]:
        """Every registration of ``user``."""

        def run(conn: Connection) -> list[PushRegistration]:
            r = registrations.c
            rows = conn.execute(
                select(registrations).where(r.user_id == user).order_by(r.created, r.device)
            )
            return [
                PushRegistration(
                    provider=row.provider,
                    device=row.device,
                    target=msgspec.json.decode(row.target),
                    created=row.created,
                )
                for row in rows
            ]

        return await self._read(run)

    async def registration(self, user: str, device: str, provider: str) -> Registration | None:
        def run(conn: Connection) -> Registration | None:
            r = registrations.c
            row = conn.execute(
                select(registrations).where(
                    r.user_id == user, r.device == device, r.provider == provider
                )
            ).first()
            return None if row is None else _reg(row)

        return await self._read(run)

    async def set_setting(self, user: str, conv: str, **values: Any) -> None:
        """Set ``muted_until`` and/or ``level`` of (user, conv)."""

        def run(conn: Connection) -> None:
            c = conv_settings.c
            where = (c.user_id == user, c.conv == conv)
            if conn.execute(update(conv_settings).where(*where).values(**values)).rowcount:
                return
            row = {"user_id": user, "conv": conv, "muted_until": 0, "level": "all", **values}
            conn.execute(insert(conv_settings).values(**row))

        await self._write(run)

    # --- ingest -------------------------------------------------------------------

    async def cursor(self) -> int:
        """The newest message timestamp ingested (0 before the first)."""

        def run(conn: Connection) -> int:
            found = conn.scalar(select(push_cursor.c.value).where(push_cursor.c.name == CURSOR_TS))
            return int(found or 0)

        return await self._read(run)

    async def ingest(self, plan: IngestPlan) -> IngestResult:
        """Decide and store the pushes of a batch (see the module docstring)."""
        return await self._write(_ingest, plan)

    # --- the worker ------------------------------------------------------------------

    async def resume(self, now: int) -> int:
        """At start: jobs left ``sending`` by a stop are due again (same key)."""

        def run(conn: Connection) -> int:
            j = push_jobs.c
            return (
                conn.execute(
                    update(push_jobs)
                    .where(j.state == SENDING)
                    .values(state=QUEUED, next_at=now, updated=now)
                ).rowcount
                or 0
            )

        return await self._write(run)

    async def claim(self, provider: str, now: int, limit: int) -> list[Job]:
        """Up to ``limit`` due waiting jobs of ``provider``, oldest first, now ``sending``."""

        def run(conn: Connection) -> list[Job]:
            j = push_jobs.c
            rows = conn.execute(
                select(push_jobs)
                .where(j.state.in_(WAITING), j.next_at <= now, j.provider == provider)
                .order_by(j.next_at, j.id)
                .limit(limit)
            ).all()
            if not rows:
                return []
            ids = [row.id for row in rows]
            conn.execute(update(push_jobs).where(j.id.in_(ids)).values(state=SENDING, updated=now))
            return [
                Job(
                    id=row.id,
                    key=row.key,
                    kind=row.kind,
                    user=row.user_id,
                    device=row.device,
                    provider=row.provider,
                    conv=row.conv,
                    seq=row.seq,
                    count=row._mapping["count"],
                    title=row.title,
                    body=row.body,
                    attempts=row.attempts,
                )
                for row in rows
            ]

        return await self._write(run)

    async def next_due(self) -> int | None:
        """When the earliest waiting job is due (ms), if any."""

        def run(conn: Connection) -> int | None:
            j = push_jobs.c
            found = conn.scalar(select(func.min(j.next_at)).where(j.state.in_(WAITING)))
            return None if found is None else int(found)

        return await self._read(run)

    async def finish(self, job: Job, outcome: Outcome, state: str, next_at: int, now: int) -> None:
        """Record an attempt and the job's next state; ``gone`` also deletes the
        registration."""

        def run(conn: Connection) -> None:
            n = job.attempts + 1
            conn.execute(
                insert(push_attempts).values(
                    job_id=job.id,
                    n=n,
                    at=now,
                    status=outcome.status,
                    code=outcome.code,
                    detail=outcome.detail[:1000],
                )
            )
            conn.execute(
                update(push_jobs)
                .where(push_jobs.c.id == job.id)
                .values(state=state, attempts=n, next_at=next_at, updated=now)
            )
            if outcome.status == "gone":
                r = registrations.c
                conn.execute(
                    delete(registrations).where(
                        r.user_id == job.user, r.device == job.device, r.provider == job.provider
                    )
                )

        await self._write(run)

    async def abandon(self, job: Job, now: int) -> None:
        """A job whose registration no longer exists: ``failed``, without an attempt."""

        def run(conn: Connection) -> None:
            conn.execute(
                update(push_jobs).where(push_jobs.c.id == job.id).values(state=FAILED, updated=now)
            )

        await self._write(run)

    async def waiting(self) -> dict[str, int]:
        """provider -> jobs waiting (the queue depth)."""

        def run(conn: Connection) -> dict[str, int]:
            j = push_jobs.c
            rows = conn.execute(
                select(j.provider, func.count()).where(j.state.in_(WAITING)).group_by(j.provider)
            )
            return {row[0]: int(row[1]) for row in rows}

        return await self._read(run)

    async def prune(self, cutoff: int) -> None:
        """Delete finished jobs (with their attempts) and decisions older than ``cutoff``."""

        def run(conn: Connection) -> None:
            j = push_jobs.c
            old = select(j.id).where(j.state.in_(FINISHED), j.updated < cutoff)
            conn.execute(delete(push_attempts).where(push_attempts.c.job_id.in_(old)))
            conn.execute(delete(push_jobs).where(j.state.in_(FINISHED), j.updated < cutoff))
            conn.execute(delete(push_decisions).where(push_decisions.c.created < cutoff))

        await self._write(run)

    # --- trace ------------------------------------------------------------------------

    async def trace(self, conv: str, seq: int) -> list[PushRecipient]:
        """The decisions of message (conv, seq) with the jobs they made or joined."""
        return await self._read(_trace, conv, seq)


def _ingest(conn: Connection, plan: IngestPlan) -> IngestResult:
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
        msgs = [m for m in msgs if (m.conv, m.seq) not in done]
    users = sorted({u for m in msgs for u in m.members} | {r.user for r in plan.reads})
    regs = _registrations_of(conn, users, plan.providers)
    settings = _settings_of(conn, {(u, m.conv) for m in msgs for u in m.members})
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
                    key, collapsed = _enqueue_message(conn, m, reg, plan)
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


def _enqueue_message(
    conn: Connection, m: CommittedMessage, reg: Registration, plan: IngestPlan
) -> tuple[str, bool]:
    """Create the push of ``m`` for one device, or fold it into the waiting one."""
    j = push_jobs.c
    found = conn.execute(
        select(j.id, j.key, j.count, j.seq).where(
            j.user_id == reg.user,
            j.device == reg.device,
            j.conv == m.conv,
            j.kind == "message",
            j.provider == reg.provider,
            j.state.in_(WAITING),
        )
    ).first()
    if found is not None:
        conn.execute(
            update(push_jobs)
            .where(j.id == found.id)
            .values(
                count=found._mapping["count"] + 1,
                seq=max(found.seq, m.seq),
                title=m.sender,
                body=m.body,
                updated=plan.now,
            )
        )
        return str(found.key), True
    key = f"{reg.user}:{reg.device}:{m.conv}:{m.seq}"
    conn.execute(
        insert(push_jobs).values(
            key=key,
            kind="message",
            user_id=reg.user,
            device=reg.device,
            provider=reg.provider,
            conv=m.conv,
            seq=m.seq,
            count=1,
            title=m.sender,
            body=m.body,
            state=QUEUED,
            attempts=0,
            next_at=plan.now + plan.collapse_ms,
            created=plan.now,
            updated=plan.now,
        )
    )
    return key, False


def _enqueue_read(conn: Connection, read: ReadMoved, reg: Registration, now: int) -> None:
    """A silent ``read`` push for one of the user's other devices (a waiting one of the
    same conversation moves to the newer seq)."""
    j = push_jobs.c
    found = conn.execute(
        select(j.id, j.seq).where(
            j.user_id == reg.user,
            j.device == reg.device,
            j.conv == read.conv,
            j.kind == "read",
            j.provider == reg.provider,
            j.state.in_(WAITING),
        )
    ).first()
    if found is not None:
        conn.execute(
            update(push_jobs)
            .where(j.id == found.id)
            .values(seq=max(found.seq, read.seq), updated=now)
        )
        return
    key = f"{reg.user}:{reg.device}:{read.conv}:{read.seq}"
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
                found.setdefault(row.user_id, []).append(_reg(row))
    return found


def _settings_of(conn: Connection, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], tuple[int, str]] = {}
    c = conv_settings.c
    for conv in {k[1] for k in keys}:
        users = sorted(u for u, cv in keys if cv == conv)
        for chunk in chunks(users):
            rows = conn.execute(
                select(c.user_id, c.muted_until, c.level).where(
                    c.conv == conv, c.user_id.in_(chunk)
                )
            )
            for row in rows:
                found[(row.user_id, conv)] = (int(row.muted_until), str(row.level))
    return found


def _trace(conn: Connection, conv: str, seq: int) -> list[PushRecipient]:
    d = push_decisions.c
    rows = conn.execute(
        select(push_decisions).where(d.conv == conv, d.seq == seq).order_by(d.user_id)
    ).all()
    out: list[PushRecipient] = []
    j = push_jobs.c
    for row in rows:
        detail = msgspec.json.decode(row.detail)
        pushes_: list[PushJob] = []
        for device, provider, key, collapsed in detail["jobs"]:
            job = conn.execute(
                select(push_jobs).where(and_(j.kind == "message", j.key == key))
            ).first()
            if job is None:
                continue
            attempts = [
                PushAttempt(n=a.n, at=a.at, status=a.status, code=a.code, detail=a.detail)
                for a in conn.execute(
                    select(push_attempts)
                    .where(push_attempts.c.job_id == job.id)
                    .order_by(push_attempts.c.n)
                )
            ]
            pushes_.append(
                PushJob(
                    key=key,
                    kind=job.kind,
                    device=device,
                    provider=provider,
                    seq=job.seq,
                    count=job._mapping["count"],
                    state=job.state,
                    collapsed=bool(collapsed),
                    attempts=attempts,
                )
            )
        out.append(
            PushRecipient(
                user=row.user_id,
                due=bool(row.due),
                reason=row.reason,
                online=list(detail["online"]),
                muted_until=detail["muted_until"],
                level=detail["level"],
                mentioned=detail["mentioned"],
                pushes=pushes_,
            )
        )
    return out
