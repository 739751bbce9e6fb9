"""Which database each service uses: the ``storage`` settings resolved into URLs.

A service's database is, in order: ``storage.<service>.url``, then ``storage.url``,
then the SQLite file ``<data_dir>/<service>.db`` (the embedded default). A
``read_url`` names a replica for the reads that tolerate lag.

Credentials never have to be on a command line: a URL may come from the environment
(``IMSERVER_STORAGE__URL``, ``IMSERVER_STORAGE__MESSAGE__URL``…) and its password
from a file (``password_file``), which is read here and put into the URL. asyncpg
also reads ``PGPASSWORD`` and ``~/.pgpass`` when the URL has no password.

URLs are normalised to the async drivers IMServer ships with: ``postgresql://`` (or
``postgres://``) becomes ``postgresql+asyncpg://``, ``mysql://`` and ``mariadb://``
become ``mysql+asyncmy://`` (with ``charset=utf8mb4`` unless the URL names one),
``sqlite://`` becomes ``sqlite+aiosqlite://``. Any other scheme, or a driver other
than these, is a configuration error naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from imserver.storage.sql import sqlite_url
from imserver.utils.config import DatabaseConfig, StorageConfig
from imserver.utils.errors import BadRequest

SERVICES = ("user", "message", "room", "file", "notification")
"""The services that own a database."""

WITH_REPLICA_READS = frozenset({"user", "message", "room"})
"""Services with reads that tolerate lag: the user directory listing, message search,
the room directory. The others refuse a ``read_url``."""

ASYNC_DRIVERS = {
    "sqlite": "aiosqlite",
    "postgresql": "asyncpg",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
}
"""The driver of each dialect (the one IMServer installs)."""

_SCHEMES = {"postgres": "postgresql", "mariadb": "mysql"}


class ServiceDatabase(NamedTuple):
    """The URLs of one service's database."""

    url: str
    """The primary: every write, and every read that must see them."""
    read_url: str | None
    """The replica for lag-tolerant reads, or ``None``."""


def normalise_url(url: str, setting: str = "url") -> str:
    """``url`` with the async driver of its dialect (see the module docstring).

    :class:`BadRequest` naming ``setting`` for a URL that does not parse or names a
    database or driver IMServer cannot use.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BadRequest(f"invalid configuration: {setting} is not a database URL") from None
    backend = _SCHEMES.get(parsed.get_backend_name(), parsed.get_backend_name())
    driver = ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise BadRequest(
            f"invalid configuration: {setting}: unsupported database {backend!r} "
            "(sqlite, postgresql, mysql or mariadb)"
        )
    given = parsed.get_driver_name() if "+" in parsed.drivername else None
    if given is not None and given != driver:
        raise BadRequest(
            f"invalid configuration: {setting}: use the {driver} driver "
            f"({backend}+{driver}://), not {given}"
        )
    parsed = parsed.set(drivername=f"{backend}+{driver}")
    if backend == "mysql" and "charset" not in parsed.query:
        # Four-byte characters (emoji) need utf8mb4; the driver's default is utf8 (3 bytes).
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return _render(parsed)


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _read_password(path: str, setting: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadRequest(
            f"invalid configuration: {setting}: cannot read {path}: {exc.strerror}"
        ) from None


def with_password(url: str, password_file: str, setting: str) -> str:
    """``url`` with the password held in ``password_file`` (no change when it is empty)."""
    if not password_file:
        return url
    password = _read_password(password_file, setting)
    return _render(make_url(url).set(password=password))


def service_database(storage: StorageConfig, data_dir: Path, service: str) -> ServiceDatabase:
    """The database of ``service`` (one of :data:`SERVICES`) under ``storage``."""
    own: DatabaseConfig = getattr(storage, service)
    prefix = f"storage.{service}"
    if own.url:
        url, setting = own.url, f"{prefix}.url"
    elif storage.url:
        url, setting = storage.url, "storage.url"
    else:
        url, setting = sqlite_url(data_dir, service), f"{prefix}.url"
    url = normalise_url(url, setting)
    password_file = own.password_file or storage.password_file
    password_setting = f"{prefix}.password_file" if own.password_file else "storage.password_file"
    if not url.startswith("sqlite"):
        url = with_password(url, password_file, password_setting)
    read_url = None
    if own.read_url and service not in WITH_REPLICA_READS:
        raise BadRequest(
            f"invalid configuration: {prefix}.read_url: the {service} service has no "
            "reads that tolerate lag"
        )
    if own.read_url:
        read_url = normalise_url(own.read_url, f"{prefix}.read_url")
        if not read_url.startswith("sqlite"):
            read_url = with_password(read_url, password_file, password_setting)
    return ServiceDatabase(url, read_url)


def redacted(url: str) -> str:
    """``url`` with its password masked, for log lines."""
    return make_url(url).render_as_string(hide_password=True)
