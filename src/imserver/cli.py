"""The ``imserver`` command.

imserver serve   [--config FILE] [--data-dir DIR] [--host H] [--http-port N] [--tcp-port N]
                 [--services NAME[,NAME...]] [--rpc-port N]
imserver migrate [--config FILE] [--data-dir DIR] [--url URL]
imserver migrate-data --from DIR [--to URL] [--batch N] [--verify-only] [--config FILE]
imserver admin   grant USERNAME | revoke USERNAME | list  [--config FILE] [--data-dir DIR]
imserver backup  TARGET [--lock-timeout S] [--config FILE] [--data-dir DIR]
imserver restore BACKUP [--config FILE] [--data-dir DIR]
imserver config  get NAME | set NAME VALUE | list  [--etcd URL] [--config FILE]
imserver cluster up [--gateways N --message N ...] | status | logs [NAME] | down  [--dir DIR]
imserver --version

``imserver serve --services`` exits with 2 before anything starts when the services
named cannot run as configured (docs/deployment.md). ``imserver config`` exits with
0 on success, 2 on a usage error or a name or value it refuses (unknown, static,
ill-typed), 1 when etcd cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from imserver import __version__
from imserver.utils.config import Config, load_config
from imserver.utils.errors import IMError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imserver", description="IMServer, an IM backend.")
    parser.add_argument("--version", action="version", version=f"imserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML configuration file (default: $IMSERVER_CONFIG)")
        p.add_argument("--data-dir", dest="data_dir", help="data directory (default ./data)")

    serve = sub.add_parser("serve", help="run the server (all services in one process)")
    common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", dest="http_port", type=int, help="HTTP/WebSocket port (8080)")
    serve.add_argument("--tcp-port", dest="tcp_port", type=int, help="TCP port (8090)")
    serve.add_argument(
        "--services",
        metavar="NAME[,NAME...]",
        help="run only these services (gateway, user, message, room, file, notification) "
        "and reach the others through etcd (default: all, in one process)",
    )
    serve.add_argument(
        "--rpc-port", dest="rpc_port", type=int, help="gRPC port of the services ([rpc] port)"
    )
    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    common(migrate)
    migrate.add_argument(
        "--url",
        help="database URL of the services, instead of storage.url (a password is better "
        "kept in the environment, IMSERVER_STORAGE__URL, or in storage.password_file)",
    )
    # --- migrate-data (docs/operations.md, "Moving from SQLite to a database server")
    move = sub.add_parser(
        "migrate-data", help="copy a SQLite data directory to a database server, and verify it"
    )
    move.add_argument("--config", help="TOML configuration file (default: $IMSERVER_CONFIG)")
    move.add_argument(
        "--from", dest="source", metavar="DIR", required=True, help="the SQLite data directory"
    )
    move.add_argument(
        "--to",
        metavar="URL",
        help="database URL of the services, instead of storage.url (storage.<service>.url "
        "still applies; a password is better kept in the environment or a password_file)",
    )
    move.add_argument(
        "--batch", type=_at_least_one, default=1000, metavar="N", help="rows per batch (1000)"
    )
    move.add_argument(
        "--verify-only", action="store_true", help="compare a copy made before; copy nothing"
    )
    # --- end of migrate-data
    admin = sub.add_parser(
        "admin", help="grant, revoke or list admin rights (server running or not)"
    )
    actions = admin.add_subparsers(dest="action", required=True)
    for action, text in (("grant", "make USERNAME an admin"), ("revoke", "take a grant back")):
        p = actions.add_parser(action, help=text)
        p.add_argument("username")
        common(p)
    common(actions.add_parser("list", help="the admins: the setting's and the granted"))
    backup = sub.add_parser(
        "backup", help="copy the data directory into an empty TARGET (server running or not)"
    )
    backup.add_argument("target", help="the backup directory (absent or empty)")
    backup.add_argument(
        "--lock-timeout",
        dest="lock_timeout",
        type=float,
        default=30.0,
        help="seconds to keep trying for the databases' locks (30)",
    )
    common(backup)
    restore = sub.add_parser(
        "restore", help="restore the BACKUP directory into an empty data directory"
    )
    restore.add_argument("source", metavar="backup", help="a directory `imserver backup` wrote")
    common(restore)
    # --- config (docs/operations.md, "The config centre")
    conf = sub.add_parser(
        "config", help="read or change the dynamic settings stored in etcd (applied live)"
    )
    conf_actions = conf.add_subparsers(dest="action", required=True)

    def etcd_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML configuration file (default: $IMSERVER_CONFIG)")
        p.add_argument(
            "--etcd",
            metavar="URL",
            action="append",
            help="an etcd endpoint, instead of [etcd] endpoints (repeatable)",
        )
        p.add_argument("--prefix", help="the key prefix, instead of [etcd] prefix")

    p = conf_actions.add_parser("get", help="the value of NAME stored in etcd")
    p.add_argument("name")
    etcd_options(p)
    p = conf_actions.add_parser("set", help="store VALUE (JSON, or a bare string) for NAME")
    p.add_argument("name")
    p.add_argument("value")
    etcd_options(p)
    etcd_options(conf_actions.add_parser("list", help="every dynamic setting and its value"))
    from imserver.cluster.command import add_parser as add_cluster_parser

    add_cluster_parser(sub)
    return parser


def _backup(config: Config, target: str, lock_timeout: float) -> int:
    from imserver.core.backup import backup

    manifest = backup(
        Path(config.data_dir),
        Path(target),
        storage=config.storage,
        files_backend=config.files.backend,
        lock_timeout=lock_timeout,
        progress=print,
    )
    for key in manifest.missing_blobs:
        print(f"blob {key} deleted by the clean-up before it was copied (no message names it)")
    if manifest.files_backend == "s3":
        print(f"blobs are in the S3 bucket {config.files.s3_bucket!r}: back it up separately")
    print(
        f"backup of {manifest.source} as of {manifest.snapshot_at} written to {target}: "
        f"{manifest.count('database')} databases, {manifest.count('blob')} blobs, "
        f"{manifest.total_bytes} bytes"
    )
    return 0


def _restore(config: Config, source: str) -> int:
    from imserver.core.backup import restore

    manifest = restore(Path(source), Path(config.data_dir))
    print(
        f"restored the backup of {manifest.snapshot_at} into {config.data_dir}: "
        f"{len(manifest.entries)} files, {manifest.total_bytes} bytes"
    )
    return 0


def _at_least_one(value: str) -> int:
    """An argparse type: an integer of 1 or more (``migrate-data --batch``)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return number


def _config_command(config: Config, args: argparse.Namespace) -> int:
    from imserver.discovery.config_command import run_config_command

    etcd = config.etcd
    endpoints = args.etcd or etcd.endpoints
    prefix = args.prefix or etcd.prefix
    return asyncio.run(
        run_config_command(
            endpoints,
            prefix,
            args.action,
            getattr(args, "name", None),
            getattr(args, "value", None),
            request_timeout=etcd.request_timeout,
            out=sys.stdout,
            err=sys.stderr,
        )
    )


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        key: getattr(args, key, None) for key in ("data_dir", "host", "http_port", "tcp_port")
    }
    if args.command == "migrate-data":  # the data directory is the one moved
        overrides["data_dir"] = args.source
    return load_config(args.config, overrides=overrides)


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _services(config: Config, text: str | None) -> frozenset[str] | None:
    """The services of ``--services`` (None: the embedded mode); raises ``ValueError``
    (:class:`~imserver.core.plan.PlanError`) for a plan that cannot work."""
    if text is None:
        return None
    from imserver.core.plan import check_plan, is_embedded, parse_services

    names = parse_services(text)
    if is_embedded(names):
        return None
    check_plan(config, names)
    return names


async def _serve(
    config: Config, services: frozenset[str] | None = None, rpc_port: int | None = None
) -> None:
    from imserver.core.server import Server

    server = Server(config, services, rpc_port=rpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "cluster":  # its processes read their own configuration
        from imserver.cluster.command import run as run_cluster

        return run_cluster(args)
    try:
        config = _config(args)
    except (IMError, OSError) as exc:
        print(f"imserver: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "config":
        return _config_command(config, args)
    _install_uvloop()
    if args.command == "migrate":
        from imserver.core.server import migrate

        try:
            lines = asyncio.run(migrate(config, getattr(args, "url", None)))
        except IMError as exc:
            print(f"imserver: {exc}", file=sys.stderr)
            return 2
        print("migrations applied:")
        for line in lines:
            print(f"  {line}")
        return 0
    if args.command == "migrate-data":
        # The report says what was migrated and copied; Alembic's log lines (some
        # written when it is imported) would come between the progress bars.
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        from pathlib import Path

        from imserver.core.datamove.command import Move, run

        move = Move(Path(args.source), args.to, args.batch, args.verify_only)
        return run(config, move, sys.stdout, sys.stderr)
    if args.command == "admin":
        from imserver.core.admins import admin_command

        try:
            lines = asyncio.run(admin_command(config, args.action, getattr(args, "username", None)))
        except IMError as exc:
            print(f"imserver: {exc}", file=sys.stderr)
            return 1
        for line in lines:
            print(line)
        return 0
    if args.command in ("backup", "restore"):
        try:
            if args.command == "backup":
                return _backup(config, args.target, args.lock_timeout)
            return _restore(config, args.source)
        except (IMError, OSError) as exc:
            print(f"imserver: {exc}", file=sys.stderr)
            return 1
    try:
        services = _services(config, args.services)
    except ValueError as exc:
        print(f"imserver: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(config, services, args.rpc_port))
    return 0
