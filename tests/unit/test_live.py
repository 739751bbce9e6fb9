"""Dynamic settings (utils/live.py): the catalogue's checks, the cells, and the
services reading them per request."""

from __future__ import annotations

import logging
import time

import pytest

from imserver.discovery.config_centre import parse_cli_value
from imserver.services.gateway.ratelimit import TokenBucket
from imserver.utils.config import Config, load_config
from imserver.utils.errors import BadRequest
from imserver.utils.live import DYNAMIC, LiveSettings, check_name, parse_value


def test_every_dynamic_setting_is_a_setting_of_the_configuration() -> None:
    live = LiveSettings(Config())
    for name in DYNAMIC:
        node: object = Config()
        for part in name.split("."):
            node = getattr(node, part)
        assert live.value(name) == node


def test_static_and_unknown_names_are_refused_with_their_reason() -> None:
    with pytest.raises(BadRequest, match="http_port is a static setting"):
        check_name("http_port")
    with pytest.raises(BadRequest, match=r"storage\.url is a static setting"):
        check_name("storage.url")
    with pytest.raises(BadRequest, match=r"unknown setting 'rooms\.maxsize'"):
        check_name("rooms.maxsize")


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("rooms.max_size", 0, "Expected `int` >= 1"),
        ("rooms.max_size", "3", "Expected `int`, got `str`"),
        ("rooms.max_size", 2.5, "Expected `int`, got `float`"),
        ("limits.rate_per_s", 0, "Expected `float` > 0"),
        ("log_level", "loud", "(one of: debug, info, warning, error, critical)"),
        ("files.quota_per_user", -1, "Expected `int` >= 0"),
        ("files.max_size", True, "Expected `int`, got `bool`"),
    ],
)
def test_ill_typed_values_are_refused_naming_the_setting(
    name: str, value: object, why: str
) -> None:
    with pytest.raises(BadRequest) as info:
        parse_value(name, value)
    assert info.value.message.startswith(f"invalid value {value!r} for {name}: ")
    assert why in info.value.message


def test_values_from_the_command_line() -> None:
    assert parse_cli_value("rooms.max_size", "3") == 3
    assert parse_cli_value("limits.rate_per_s", "2.5") == 2.5
    assert parse_cli_value("limits.rate_per_s", "4") == 4.0
    assert parse_cli_value("log_level", "debug") == "debug"
    assert parse_cli_value("log_level", '"warning"') == "warning"
    with pytest.raises(BadRequest, match=r"invalid value 'three' for rooms\.max_size"):
        parse_cli_value("rooms.max_size", "three")


def test_apply_changes_a_cell_and_none_restores_the_configured_value() -> None:
    config = load_config(environ={"IMSERVER_ROOMS__MAX_SIZE": "50"})
    live = LiveSettings(config)
    cell = live.room_max_size
    assert cell.value == 50
    assert live.apply("rooms.max_size", 3) is True
    assert cell.value == 3
    assert live.apply("rooms.max_size", 3) is False
    assert live.apply("rooms.max_size", None) is True
    assert cell.value == 50


def test_log_level_applies_to_the_root_logger() -> None:
    root = logging.getLogger()
    before = root.level
    try:
        live = LiveSettings(Config())
        live.apply("log_level", "error")
        assert root.level == logging.ERROR
        live.apply("log_level", "debug")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


def test_a_bucket_reads_its_limits_at_each_op() -> None:
    live = LiveSettings(Config())
    live.apply("limits.rate_per_s", 1.0)
    live.apply("limits.rate_burst", 2)
    bucket = TokenBucket(live.rate_per_s, live.rate_burst)
    t0 = time.monotonic() + 1000.0  # later than the bucket's creation: it starts full
    assert bucket.take(now=t0) == 0.0
    assert bucket.take(now=t0) == 0.0
    assert bucket.take(now=t0) == 1.0  # empty: one token per second
    live.apply("limits.rate_per_s", 4.0)
    assert bucket.take(now=t0) == 0.25  # the next op sees the new rate
    live.apply("limits.rate_burst", 1)
    assert bucket.take(now=t0 + 100.0) == 0.0  # refilled to the new burst of 1 only
    assert bucket.take(now=t0 + 100.0) == 0.25


def test_the_etcd_settings() -> None:
    config = load_config(
        environ={
            "IMSERVER_ETCD__ENDPOINTS": '["http://10.0.0.5:2379", "http://10.0.0.6:2379"]',
            "IMSERVER_ETCD__LEASE_TTL": "6",
            "IMSERVER_ETCD__BREAKER_FAILURES": "3",
        }
    )
    etcd = config.etcd
    assert etcd.endpoints == ["http://10.0.0.5:2379", "http://10.0.0.6:2379"]
    assert (etcd.prefix, etcd.lease_ttl, etcd.breaker_failures) == ("/imserver", 6, 3)
    assert (etcd.breaker_cooldown, etcd.breaker_probes, etcd.request_timeout) == (5.0, 1, 3.0)
    assert Config().etcd.endpoints == []  # no etcd unless asked for
    with pytest.raises(BadRequest, match=r"Expected `int` <= 60 - at `\$\.etcd\.lease_ttl`"):
        load_config(environ={"IMSERVER_ETCD__LEASE_TTL": "61"})
