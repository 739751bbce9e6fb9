"""The notification service's SQL store: registrations, settings, the outbox as the
worker sees it (claims, attempts, the queue depth, pruning) and the trace of the
decision log (tables in :mod:`~imserver.services.notification.schema`).

An ingest — the decisions, collapse and bound of one batch of committed messages —
is one transaction of its own, written in
:mod:`~imserver.services.notification.ingest`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Connection, and_, delete, func, insert, select, update

from imserver.protocol.models import PushAttempt, PushJob, PushRecipient, PushRegistration
from imserver.services.notification.ingest import CURSOR_TS, IngestPlan, IngestResult, ingest
from imserver.services.notification.providers.base import Outcome, Registration
from imserver.services.notification.schema import (
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
    registration_from_row,
    registrations,
)
from imserver.storage.runners import SqlStore


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
            return None if row is None else registration_from_row(row)

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
        return await self._write(ingest, plan)

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
