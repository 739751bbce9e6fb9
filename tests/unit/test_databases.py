"""Which database each service uses: ``storage.url``, ``storage.<service>.url``,
``read_url``, passwords from a file, and the SQLite default."""

from __future__ import annotations

from pathlib import Path

import pytest

from imserver.storage.databases import normalise_url, redacted, service_database
from imserver.storage.sql import sqlite_url
from imserver.utils.config import load_config
from imserver.utils.errors import BadRequest

PG = "postgresql+asyncpg://im@db.example:5432/im"
MY = "mysql+asyncmy://im@db.example:3306/im?charset=utf8mb4"


def resolve(tmp_path: Path, service: str, **env: str) -> tuple[str, str | None]:
    config = load_config(environ=env)
    return tuple(service_database(config.storage, tmp_path, service))  # type: ignore[return-value]


def test_default_is_one_sqlite_file_per_service(tmp_path: Path) -> None:
    for service in ("user", "message", "room", "file", "notification"):
        assert resolve(tmp_path, service) == (sqlite_url(tmp_path, service), None)


def test_storage_url_applies_to_every_service(tmp_path: Path) -> None:
    env = {"IMSERVER_STORAGE__URL": PG}
    for service in ("user", "message", "room", "file", "notification"):
        assert resolve(tmp_path, service, **env) == (PG, None)


def test_a_service_url_overrides_storage_url(tmp_path: Path) -> None:
    env = {"IMSERVER_STORAGE__URL": PG, "IMSERVER_STORAGE__MESSAGE__URL": MY}
    assert resolve(tmp_path, "message", **env) == (MY, None)
    assert resolve(tmp_path, "room", **env) == (PG, None)


def test_read_url(tmp_path: Path) -> None:
    replica = "postgresql+asyncpg://im@replica.example/im"
    env = {"IMSERVER_STORAGE__URL": PG, "IMSERVER_STORAGE__ROOM__READ_URL": replica}
    assert resolve(tmp_path, "room", **env) == (PG, replica)
    assert resolve(tmp_path, "user", **env) == (PG, None)
    for service in ("file", "notification"):
        with pytest.raises(BadRequest, match=f"storage.{service}.read_url: the {service}"):
            resolve(tmp_path, service, **{f"IMSERVER_STORAGE__{service.upper()}__READ_URL": PG})


def test_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cr%t/@:x\n", encoding="utf-8")
    env = {
        "IMSERVER_STORAGE__URL": PG,
        "IMSERVER_STORAGE__PASSWORD_FILE": str(secret),
        "IMSERVER_STORAGE__MESSAGE__READ_URL": "postgresql://im@replica.example/im",
    }
    url, read_url = resolve(tmp_path, "message", **env)
    assert url == "postgresql+asyncpg://im:s3cr%25t%2F%40%3Ax@db.example:5432/im"
    assert read_url == "postgresql+asyncpg://im:s3cr%25t%2F%40%3Ax@replica.example/im"
    assert redacted(url) == "postgresql+asyncpg://im:***@db.example:5432/im"
    # A service's own file wins; the SQLite default takes no password.
    own = tmp_path / "room-password"
    own.write_text("other", encoding="utf-8")
    env["IMSERVER_STORAGE__ROOM__PASSWORD_FILE"] = str(own)
    assert resolve(tmp_path, "room", **env)[0] == "postgresql+asyncpg://im:other@db.example:5432/im"
    del env["IMSERVER_STORAGE__URL"]
    assert resolve(tmp_path, "notification", **env)[0] == sqlite_url(tmp_path, "notification")


def test_a_missing_password_file_names_the_setting(tmp_path: Path) -> None:
    env = {"IMSERVER_STORAGE__URL": PG, "IMSERVER_STORAGE__PASSWORD_FILE": str(tmp_path / "no")}
    with pytest.raises(BadRequest, match=r"storage\.password_file: cannot read"):
        resolve(tmp_path, "user", **env)


def test_the_url_may_come_from_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "imserver.toml"
    path.write_text(f'[storage]\nurl = "{PG}"\n[storage.file]\nurl = "mariadb://im@h/f"\n')
    config = load_config(path, environ={})
    assert service_database(config.storage, tmp_path, "user").url == PG
    assert (
        service_database(config.storage, tmp_path, "file").url
        == "mysql+asyncmy://im@h/f?charset=utf8mb4"
    )


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgres://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("mysql://u@h/d", "mysql+asyncmy://u@h/d?charset=utf8mb4"),
        ("mariadb://u@h/d?charset=utf8mb4", "mysql+asyncmy://u@h/d?charset=utf8mb4"),
        ("sqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_urls_get_the_async_driver(given: str, normalised: str) -> None:
    assert normalise_url(given) == normalised


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("not a url", "storage.url is not a database URL"),
        ("oracle://u@h/d", "storage.url: unsupported database 'oracle'"),
        ("postgresql+psycopg2://u@h/d", "storage.url: use the asyncpg driver"),
        ("mysql+pymysql://u@h/d", "storage.url: use the asyncmy driver"),
    ],
)
def test_bad_urls_name_the_setting(given: str, error: str) -> None:
    with pytest.raises(BadRequest, match=error):
        normalise_url(given, "storage.url")
