"""``imserver migrate-data --from DIR [--to URL]``: the move, its refusals, its report.

The order of a move:

1. The target of each copied service is resolved as the server would resolve it
   (``storage.<service>.url``, then ``--to`` or ``storage.url``); one that would be
   SQLite is refused.
2. The source is found and held (:mod:`~imserver.core.datamove.source`): a directory
   without the services' databases, or one a server has open, is refused. Its
   schemas are brought to this version's head first.
3. The target's migrations are applied (the ``imserver migrate`` machinery), then a
   target with a row in any of the copied tables is refused: a move copies into
   empty databases only, so a copy that stops half-way is started again on emptied
   databases, never continued.
4. Every table is copied in batches (:mod:`~imserver.core.datamove.tables`), with a
   progress bar on stderr.
5. Every table is verified (:mod:`~imserver.core.datamove.verify`) and the report
   printed; a difference is an error.

``--verify-only`` runs steps 1, 2 and 5 on a target already copied.

Exit statuses: 0 copied and verified; 1 a database failed (the target's migrations,
the copy or the verification); 2 a bad configuration or target, or no readable data
at ``--from``; 3 the source is in use; 4 the target is not empty; 5 the
verification found a difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Connection, make_url, pool
from sqlalchemy.exc import SQLAlchemyError

from imserver.core.datamove.refusals import (
    BadTarget,
    CopyDiffers,
    DatabaseFailed,
    MoveRefused,
    TargetNotEmpty,
)
from imserver.core.datamove.source import SourceDir
from imserver.core.datamove.tables import TABLES, copy_table, count, filled, finish, unknown_tables
from imserver.core.datamove.verify import Check, checks
from imserver.storage.databases import SERVICES, redacted, service_database
from imserver.storage.migration_env import WrongCollation
from imserver.storage.sql import make_engine, upgrade
from imserver.utils.config import Config
from imserver.utils.errors import IMError

T = TypeVar("T")

PACKAGES = {service: f"imserver.services.{service}.migrations" for service in SERVICES}
"""The migrations of each service's database."""

COPIED = tuple(TABLES)
"""The services whose data moves (every one whose store runs on a database server)."""


BATCH = 1000
"""Rows per batch (per committed transaction) unless ``--batch`` says otherwise."""


@dataclass(frozen=True)
class Move:
    """What one ``migrate-data`` run is asked to do."""

    source: Path
    to: str | None = None
    batch: int = BATCH
    verify_only: bool = False


def targets(config: Config, move: Move) -> dict[str, str]:
    """The database URL of each copied service; :class:`BadTarget` for one on SQLite."""
    storage = config.storage
    if move.to is not None:
        storage = msgspec.structs.replace(storage, url=move.to)
    urls = {}
    for service in COPIED:
        url = service_database(storage, move.source, service).url
        if url.startswith("sqlite"):
            raise BadTarget(
                f"the {service} database would be SQLite: give --to URL (or storage.url, "
                f"storage.{service}.url) naming a PostgreSQL or MySQL/MariaDB database"
            )
        urls[service] = url
    return urls


async def _on(url: str, fn: Callable[..., T], *args: Any) -> T:
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.commit()
            return result
    finally:
        await engine.dispose()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


async def _prepare_targets(urls: dict[str, str], out: TextIO) -> None:
    for service, url in urls.items():
        await upgrade(url, PACKAGES[service])
        print(f"migrated\t{service}\t{redacted(url)}", file=out)
    found = []
    for service, url in urls.items():
        for table, rows in await _on(url, filled, service):
            found.append(f"{service}: {table} ({rows} rows)")
    if found:
        raise TargetNotEmpty(
            f"the target is not empty: {', '.join(found)}; migrate-data copies into "
            "empty databases only"
        )


def _advancer(progress: Progress, task: TaskID) -> Callable[[int], None]:
    return lambda n: progress.advance(task, n)


async def _copy(src: SourceDir, urls: dict[str, str], batch: int) -> None:
    with _progress() as progress:
        plan = []
        for service in COPIED:
            conn = src.connection(service)
            for table in TABLES[service]:
                task = progress.add_task(f"{service}.{table.name}", total=count(conn, table))
                plan.append((service, table, task))

        for service in COPIED:

            def copy_service(target: Connection, service: str = service) -> None:
                source = src.connection(service)
                for owner, table, task in plan:
                    if owner == service:
                        copy_table(source, target, table, batch, _advancer(progress, task))
                finish(target, service)

            await _on(urls[service], copy_service)


async def _verify(src: SourceDir, urls: dict[str, str], batch: int) -> list[Check]:
    results = []
    with _progress() as progress:
        for service in COPIED:
            dialect = make_url(urls[service]).get_backend_name()
            measures = checks(service, dialect)
            task = progress.add_task(f"verify {service}", total=len(measures))
            for name, on_source, on_target in measures:
                source = on_source(src.connection(service), batch)
                target = await _on(urls[service], on_target, batch)
                results.append(Check(service, name, source, target))
                progress.advance(task)
    return results


def _report(results: list[Check], out: TextIO) -> None:
    print(f"{'service':<10}{'table':<20}{'source':>10}{'target':>10}  checksum", file=out)
    for r in results:
        same = "ok" if r.source.checksum == r.target.checksum else "DIFFERS"
        print(
            f"{r.service:<10}{r.table:<20}{r.source.rows:>10}{r.target.rows:>10}  {same}",
            file=out,
        )


async def migrate_data(config: Config, move: Move, out: TextIO) -> list[Check]:
    """Run the move (module docstring); the verification's results.

    Raises :class:`MoveRefused` (its ``status`` is the exit status; a database that
    fails is :class:`DatabaseFailed`), ``IMError`` for a bad configuration.
    """
    urls = targets(config, move)
    src = SourceDir.find(move.source, COPIED)
    src.hold()
    try:
        stale = src.behind(PACKAGES)
        if stale and not move.verify_only:
            src.release()
            await src.upgrade(stale, PACKAGES)
            src.hold()
        for service in COPIED:
            extra = unknown_tables(src.connection(service), service)
            if extra:
                raise MoveRefused(
                    f"{service}.db has tables this version of IMServer does not know: "
                    f"{', '.join(extra)}"
                )
        if not move.verify_only:
            try:
                await _prepare_targets(urls, out)
            except WrongCollation as exc:
                raise BadTarget(str(exc)) from None
            except DATABASE_ERRORS as exc:
                raise DatabaseFailed(
                    f"the target's migrations failed: {_brief(exc)}; nothing was copied"
                ) from exc
            try:
                await _copy(src, urls, move.batch)
            except DATABASE_ERRORS as exc:
                raise DatabaseFailed(
                    f"the copy failed: {_brief(exc)}; the target may be partly filled: "
                    "empty its databases and run again"
                ) from exc
        try:
            results = await _verify(src, urls, move.batch)
        except DATABASE_ERRORS as exc:
            raise DatabaseFailed(f"the verification could not run: {_brief(exc)}") from exc
    finally:
        src.release()
    _report(results, out)
    differ = [f"{r.service}.{r.table}" for r in results if not r.ok]
    if differ:
        raise CopyDiffers(f"the copy differs from the source: {', '.join(differ)}")
    rows = sum(r.source.rows for r in results)
    print(f"verified: {len(results)} checks, {rows} rows, the same on both sides", file=out)
    print(
        f"left in {src.path}: the uploaded files (and the Web Push key); start the server "
        "with this data directory and the new storage settings",
        file=out,
    )
    return results


def run(config: Config, move: Move, out: TextIO, err: TextIO) -> int:
    """Run the move as the command does: its report on ``out``, a refusal or failure
    on ``err``; the exit status (module docstring)."""

    def fail(status: int, message: str) -> int:
        print(f"imserver: migrate-data: {message}", file=err)
        return status

    try:
        asyncio.run(migrate_data(config, move, out))
    except MoveRefused as exc:
        return fail(exc.status, str(exc))
    except IMError as exc:
        return fail(2, str(exc))
    return 0


DATABASE_ERRORS = (SQLAlchemyError, OSError)


def _brief(exc: BaseException) -> str:
    """The driver's own words for a database failure (SQLAlchemy adds the statement)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
