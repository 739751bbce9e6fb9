"""load_config: defaults < TOML file < IMSERVER_* environment < overrides (flags)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imserver.utils.config import Config, LimitsConfig, load_config
from imserver.utils.errors import BadRequest


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imserver.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ----------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg == Config()
    assert (cfg.host, cfg.http_port, cfg.tcp_port) == ("127.0.0.1", 8080, 8090)
    assert cfg.admins == []
    assert cfg.ws.allowed_origins == []


def test_default_limits_are_those_of_the_protocol() -> None:
    limits = load_config(environ={}).limits
    assert limits.max_frame == 65536  # docs/protocol.md §1
    assert limits.max_body == 16384  # docs/protocol.md §4: 16 KiB
    assert limits.rate_per_s == 50
    assert limits.rate_burst == 200


def test_default_lists_are_not_shared() -> None:
    a, b = load_config(environ={}), load_config(environ={})
    a.admins.append("root")
    assert b.admins == []


def test_unrelated_environment_is_ignored() -> None:
    cfg = load_config(environ={"PATH": "/bin", "HOME": "/root", "IMSERVERX_PORT": "1"})
    assert cfg == Config()


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMSERVER_CONFIG", raising=False)
    monkeypatch.setenv("IMSERVER_HTTP_PORT", "9999")
    assert load_config().http_port == 9999


# --- TOML file ---------------------------------------------------------------------


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        http_port = 9000
        admins = ["alice"]
        shutdown_grace = 1.5

        [limits]
        max_frame = 1024

        [ws]
        allowed_origins = ["https://chat.example.com"]
        """,
    )
    cfg = load_config(path, environ={})
    assert cfg.http_port == 9000
    assert cfg.admins == ["alice"]
    assert cfg.shutdown_grace == 1.5
    assert cfg.limits.max_frame == 1024
    assert cfg.limits.max_body == LimitsConfig().max_body  # rest of the section: defaults
    assert cfg.ws.allowed_origins == ["https://chat.example.com"]
    assert cfg.tcp_port == 8090


def test_file_may_be_a_str(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "tcp_port = 7000\n")
    assert load_config(str(path), environ={}).tcp_port == 7000


def test_imserver_config_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "http_port = 9100\n")
    cfg = load_config(environ={"IMSERVER_CONFIG": str(path)})
    assert cfg.http_port == 9100


def test_explicit_file_wins_over_imserver_config(tmp_path: Path) -> None:
    named = write_toml(tmp_path, "http_port = 1111\n")
    other = tmp_path / "other.toml"
    other.write_text("http_port = 2222\n", encoding="utf-8")
    cfg = load_config(other, environ={"IMSERVER_CONFIG": str(named)})
    assert cfg.http_port == 2222


# --- environment -------------------------------------------------------------------


def test_env_top_level_and_sections() -> None:
    cfg = load_config(
        environ={
            "IMSERVER_HTTP_PORT": "9001",
            "IMSERVER_LIMITS__MAX_FRAME": "131072",
            "IMSERVER_LIMITS__RATE_PER_S": "2.5",
            "IMSERVER_AUTH__ACCESS_TTL": "60",
            "IMSERVER_STORAGE__BATCH_MAX": "8",
        }
    )
    assert cfg.http_port == 9001
    assert cfg.limits.max_frame == 131072
    assert cfg.limits.rate_per_s == 2.5
    assert cfg.limits.rate_burst == 200
    assert cfg.auth.access_ttl == 60
    assert cfg.storage.batch_max == 8


def test_env_arrays() -> None:
    cfg = load_config(
        environ={
            "IMSERVER_WS__ALLOWED_ORIGINS": '["https://chat.example.com", "https://b.example"]',
            "IMSERVER_ADMINS": '["alice", "bob"]',
        }
    )
    assert cfg.ws.allowed_origins == ["https://chat.example.com", "https://b.example"]
    assert cfg.admins == ["alice", "bob"]


def test_env_int_for_float_setting() -> None:
    assert load_config(environ={"IMSERVER_SHUTDOWN_GRACE": "2"}).shutdown_grace == 2.0


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("HOST", "0.0.0.0"),
        ("HOST", "::1"),
        ("LOG_LEVEL", "debug"),
        ("DATA_DIR", "/var/lib/imserver"),
        # TOML-looking text is still the text for a string setting.
        ("SERVER_NAME", "2024"),
        ("SERVER_NAME", "true"),
        ("SERVER_NAME", "1979-05-27"),
        ("SERVER_NAME", "[1, 2]"),
    ],
)
def test_env_string_settings_take_the_raw_text(name: str, raw: str) -> None:
    cfg = load_config(environ={f"IMSERVER_{name}": raw})
    assert getattr(cfg, name.lower()) == raw


def test_env_quoted_toml_string() -> None:
    assert load_config(environ={"IMSERVER_SERVER_NAME": '"my server"'}).server_name == "my server"


def test_env_wrong_type_is_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        load_config(environ={"IMSERVER_HTTP_PORT": "eighty"})
    assert "http_port" in info.value.message


@pytest.mark.parametrize(
    "environ",
    [
        {"IMSERVER_LIMITS": "5", "IMSERVER_LIMITS__MAX_FRAME": "1"},
        {"IMSERVER_LIMITS__MAX_FRAME": "1", "IMSERVER_LIMITS": "5"},
        {"IMSERVER_HTTP_PORT": "1", "IMSERVER_HTTP_PORT__X": "1"},
    ],
)
def test_env_section_and_value_clash_is_bad_request(environ: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        load_config(environ=environ)


# --- precedence --------------------------------------------------------------------


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        http_port = 1001
        tcp_port = 1002
        host = "file.example"
        log_level = "warning"

        [limits]
        max_frame = 111
        max_body = 222
        """,
    )
    cfg = load_config(
        path,
        environ={
            "IMSERVER_TCP_PORT": "2002",
            "IMSERVER_HOST": "env.example",
            "IMSERVER_LIMITS__MAX_FRAME": "333",
        },
        overrides={"host": "flag.example", "log_level": None},
    )
    assert cfg.http_port == 1001  # file only
    assert cfg.tcp_port == 2002  # env beats file
    assert cfg.host == "flag.example"  # override beats env and file
    assert cfg.log_level == "warning"  # a None override (flag not given) changes nothing
    assert cfg.limits.max_frame == 333  # env beats file inside a section ...
    assert cfg.limits.max_body == 222  # ... without dropping the file's other keys
    assert cfg.limits.rate_burst == 200  # default
    assert cfg.data_dir == "./data"  # default


def test_nested_overrides_merge_into_sections(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[limits]\nmax_body = 10\n")
    cfg = load_config(
        path,
        environ={"IMSERVER_LIMITS__RATE_BURST": "5"},
        overrides={"limits": {"max_frame": 99}},
    )
    assert (cfg.limits.max_frame, cfg.limits.max_body, cfg.limits.rate_burst) == (99, 10, 5)


def test_env_beats_imserver_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "http_port = 1\n")
    cfg = load_config(environ={"IMSERVER_CONFIG": str(path), "IMSERVER_HTTP_PORT": "2"})
    assert cfg.http_port == 2


# --- unknown keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "name"),
    [
        ("htp_port = 1\n", "htp_port"),
        ("[limits]\nmax_frames = 1\n", "max_frames"),
        ("[nope]\nx = 1\n", "nope"),
    ],
)
def test_unknown_key_in_file_is_bad_request(tmp_path: Path, toml: str, name: str) -> None:
    with pytest.raises(BadRequest) as info:
        load_config(write_toml(tmp_path, toml), environ={})
    assert info.value.code == "bad_request"
    assert name in info.value.message


@pytest.mark.parametrize(
    ("key", "name"),
    [("IMSERVER_NOPE", "nope"), ("IMSERVER_LIMITS__NOPE", "nope"), ("IMSERVER_WS__X", "x")],
)
def test_unknown_key_in_env_is_bad_request(key: str, name: str) -> None:
    with pytest.raises(BadRequest) as info:
        load_config(environ={key: "1"})
    assert name in info.value.message


def test_unknown_override_is_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        load_config(environ={}, overrides={"bogus": 1})
    assert "bogus" in info.value.message


def test_wrong_type_in_file_is_bad_request(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        load_config(write_toml(tmp_path, 'http_port = "x"\n'), environ={})
    assert "http_port" in info.value.message


def test_events_settings() -> None:
    config = load_config(environ={})
    assert config.events.backend == "none"
    assert (config.events.prefetch, config.events.max_attempts) == (256, 5)
    config = load_config(
        environ={
            "IMSERVER_EVENTS__BACKEND": "rabbitmq",
            "IMSERVER_EVENTS__URL": "amqp://u:p@rabbit/im",
            "IMSERVER_EVENTS__BACKOFF": "[0.5, 2]",
        }
    )
    assert (config.events.backend, config.events.url) == ("rabbitmq", "amqp://u:p@rabbit/im")
    assert config.events.backoff == [0.5, 2.0]


@pytest.mark.parametrize(
    ("events", "path"),
    [
        ({"backend": "kafka"}, "$.events.backend"),
        ({"backoff": []}, "$.events.backoff"),
        ({"backoff": [1.0, 0]}, "$.events.backoff[1]"),
        ({"max_attempts": 0}, "$.events.max_attempts"),
        ({"prefetch": 0}, "$.events.prefetch"),
    ],
)
def test_bad_events_settings_are_bad_request(events: dict[str, object], path: str) -> None:
    with pytest.raises(BadRequest) as info:
        load_config(environ={}, overrides={"events": events})
    assert info.value.code == "bad_request"
    assert "invalid configuration: " in str(info.value) and path in str(info.value)
