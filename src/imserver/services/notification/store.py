"""The notification service's SQL store: registrations, settings, the outbox as the
worker sees it (claims, attempts, the queue depth, pruning) and the trace of the
decision log (tables in :mod:`~imserver.services.notification.schema`).

An ingest — the decisions, collapse and bound of one batch of committed messages —
is one transaction of its own, written in
:mod:`~imserver.services.notification.ingest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import Connection, and_, bindparam, delete, func, insert, select, update

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
    registrations,
)
from imserver.storage.runners import SqlStore


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed job, as the worker sends it."""

    id: int
    key: str
    kind: str
    provider: str
    conv: str
    seq: int
    count: int
    title: str
    body: str
    attempts: int
    registration: Registration
    """Where it goes (its user, device and provider's target)."""


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`SqlNotificationStore.claim` took: the jobs to send, and how many due
    jobs it failed because their registration was gone."""

    jobs: list[Job]
    abandoned: int


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker turn (:meth:`SqlNotificationStore.exchange`) claimed, and when the
    earliest job still waiting is due (ms), if any."""

    claimed: dict[str, Claimed]
    next_due: int | None


class Finished(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt's answer and the job's next state."""

    job: Job
    outcome: Outcome
    state: str
    next_at: int
    at: int


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

    async def exchange(
        self, answers: Sequence[Finished], wants: Mapping[str, int], now: int
    ) -> Turn:
        """One worker turn in one transaction: record ``answers`` (each attempt and its
        job's next state; ``gone`` also deletes the registration), then claim up to
        ``wants[provider]`` due waiting jobs per provider, oldest first, now ``sending``
        and each with its registration (due jobs whose registration no longer exists
        become ``failed``, without an attempt)."""
        return await self._write(_exchange, answers, wants, now)

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


def _exchange(
    conn: Connection, answers: Sequence[Finished], wants: Mapping[str, int], now: int
) -> Turn:
    if answers:
        _finish(conn, answers)
    claimed = {name: _claim(conn, name, now, n) for name, n in wants.items() if n > 0}
    j = push_jobs.c
    due = conn.scalar(select(func.min(j.next_at)).where(j.state.in_(WAITING)))
    return Turn(claimed=claimed, next_due=None if due is None else int(due))


def _claim(conn: Connection, provider: str, now: int, limit: int) -> Claimed:
    j, r = push_jobs.c, registrations.c
    rows = conn.execute(
        select(push_jobs, r.target, r.created.label("reg_created"))
        .select_from(
            push_jobs.outerjoin(
                registrations,
                and_(r.user_id == j.user_id, r.device == j.device, r.provider == j.provider),
            )
        )
        .where(j.state.in_(WAITING), j.next_at <= now, j.provider == provider)
        .order_by(j.next_at, j.id)
        .limit(limit)
    ).all()
    jobs = [
        Job(
            id=row.id,
            key=row.key,
            kind=row.kind,
            provider=row.provider,
            conv=row.conv,
            seq=row.seq,
            count=row._mapping["count"],
            title=row.title,
            body=row.body,
            attempts=row.attempts,
            registration=Registration(
                user=row.user_id,
                device=row.device,
                provider=row.provider,
                target=msgspec.json.decode(row.target),
                created=row.reg_created,
            ),
        )
        for row in rows
        if row.target is not None
    ]
    orphans = [row.id for row in rows if row.target is None]
    for ids, state in (([job.id for job in jobs], SENDING), (orphans, FAILED)):
        if ids:
            conn.execute(update(push_jobs).where(j.id.in_(ids)).values(state=state, updated=now))
    return Claimed(jobs=jobs, abandoned=len(orphans))


def _finish(conn: Connection, results: Sequence[Finished]) -> None:
    conn.execute(
        insert(push_attempts),
        [
            {
                "job_id": f.job.id,
                "n": f.job.attempts + 1,
                "at": f.at,
                "status": f.outcome.status,
                "code": f.outcome.code,
                "detail": f.outcome.detail[:1000],
            }
            for f in results
        ],
    )
    j = push_jobs.c
    conn.execute(
        update(push_jobs)
        .where(j.id == bindparam("b_id"))
        .values(
            state=bindparam("b_state"),
            attempts=bindparam("b_attempts"),
            next_at=bindparam("b_next_at"),
            updated=bindparam("b_at"),
        ),
        [
            {
                "b_id": f.job.id,
                "b_state": f.state,
                "b_attempts": f.job.attempts + 1,
                "b_next_at": f.next_at,
                "b_at": f.at,
            }
            for f in results
        ],
    )
    r = registrations.c
    for f in results:
        if f.outcome.status == "gone":
            reg = f.job.registration
            conn.execute(
                delete(registrations).where(
                    r.user_id == reg.user, r.device == reg.device, r.provider == reg.provider
                )
            )


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
