"""The config centre on a real etcd: ``imserver config get|set|list`` (its output and
exit codes), two instances applying one ``set``, a value set while an instance was
down, and stored values the watchers must ignore."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from waiting import until

from imserver.discovery.config_centre import ConfigCentre
from imserver.discovery.etcd import EtcdClient
from imserver.testing.etcd import EtcdServer
from imserver.testing.process import free_ports
from imserver.utils.config import load_config
from imserver.utils.live import LiveSettings
from imserver.utils.metrics import Metrics


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``imserver config ARGS`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "imserver", "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def prefix() -> str:
    return f"/imtest-{secrets.token_hex(4)}"


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    c = EtcdClient([etcd.url], timeout=1.0)
    try:
        yield c
    finally:
        await c.close()


class Instance:
    """One server's side of the config centre: its settings, metrics and watcher."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.live = LiveSettings(load_config(environ={}))
        self.metrics = Metrics()
        self.centre = ConfigCentre(
            client, self.live, prefix=prefix, metrics=self.metrics.discovery, retry_max=0.5
        )

    async def __aenter__(self) -> Instance:
        self.centre.start()
        assert await self.centre.wait_synced(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.centre.stop()


async def test_two_instances_apply_a_set_made_with_the_command(
    etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    c1 = EtcdClient([etcd.url], timeout=1.0)
    c2 = EtcdClient([etcd.url], timeout=1.0)
    try:
        async with Instance(c1, prefix) as one, Instance(c2, prefix) as two:
            assert one.live.room_max_size.value == two.live.room_max_size.value == 10000
            done = await asyncio.to_thread(
                run_cli, "set", "rooms.max_size", "3", "--etcd", etcd.url, "--prefix", prefix
            )
            assert done.returncode == 0, done.stderr
            match = re.fullmatch(r"rooms\.max_size = 3 \(revision (\d+)\)\n", done.stdout)
            assert match, done.stdout
            revision = int(match.group(1))
            for instance in (one, two):
                await until(lambda i=instance: i.live.room_max_size.value == 3, "applied")
                assert instance.live.revision == revision
                text = instance.metrics.render().decode()
                assert f"imserver_config_revision {float(revision)}" in text
                assert (
                    'imserver_config_changes_total{name="rooms.max_size",result="applied"} 1.0'
                    in text
                )
            assert f"config: rooms.max_size = 3 at revision {revision}" in caplog.text

            done = await asyncio.to_thread(
                run_cli, "set", "log_level", "warning", "--etcd", etcd.url, "--prefix", prefix
            )
            assert done.returncode == 0, done.stderr
            await until(lambda: two.live.value("log_level") == "warning", "log level applied")
            assert logging.getLogger().level == logging.WARNING
    finally:
        logging.getLogger().setLevel(logging.INFO)
        await c1.close()
        await c2.close()


async def test_a_value_set_while_an_instance_was_down_applies_at_its_start(
    etcd: EtcdServer, client: EtcdClient, prefix: str
) -> None:
    done = await asyncio.to_thread(
        run_cli, "set", "files.max_size", "1048576", "--etcd", etcd.url, "--prefix", prefix
    )
    assert done.returncode == 0, done.stderr
    async with Instance(client, prefix) as late:
        assert late.live.upload_max_size.value == 1048576  # in force once synced


async def test_get_and_list_print_the_value_and_its_revision(etcd: EtcdServer, prefix: str) -> None:
    common = ("--etcd", etcd.url, "--prefix", prefix)
    done = await asyncio.to_thread(run_cli, "get", "rooms.max_size", *common)
    assert (done.returncode, done.stdout) == (0, "rooms.max_size (not set)\n")
    done = await asyncio.to_thread(run_cli, "set", "limits.rate_per_s", "12.5", *common)
    assert done.returncode == 0, done.stderr
    revision = re.findall(r"revision (\d+)", done.stdout)[0]
    done = await asyncio.to_thread(run_cli, "get", "limits.rate_per_s", *common)
    assert (done.returncode, done.stdout) == (
        0,
        f"limits.rate_per_s = 12.5 (revision {revision})\n",
    )
    done = await asyncio.to_thread(run_cli, "list", *common)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:6] == [
        "log_level (not set)",
        f"limits.rate_per_s = 12.5 (revision {revision})",
        "limits.rate_burst (not set)",
        "rooms.max_size (not set)",
        "files.max_size (not set)",
        "files.quota_per_user (not set)",
    ]
    assert re.fullmatch(r"# etcd revision \d+", lines[6])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "http_port", "9000"), "http_port is a static setting"),
        (("set", "storage.url", "sqlite:///x"), "storage.url is a static setting"),
        (("set", "rooms.maxsize", "3"), "unknown setting 'rooms.maxsize'"),
        (("get", "nope"), "unknown setting 'nope'"),
        (("set", "rooms.max_size", "0"), "invalid value 0 for rooms.max_size"),
        (("set", "rooms.max_size", "three"), "invalid value 'three' for rooms.max_size"),
        (("set", "log_level", "loud"), "invalid value 'loud' for log_level"),
    ],
)
async def test_refused_names_and_values_exit_2_and_write_nothing(
    etcd: EtcdServer, client: EtcdClient, prefix: str, args: tuple[str, ...], message: str
) -> None:
    done = await asyncio.to_thread(run_cli, *args, "--etcd", etcd.url, "--prefix", prefix)
    assert done.returncode == 2
    assert done.stderr.startswith("imserver config: " + message), done.stderr
    assert done.stdout == ""
    entries, _ = await client.get_prefix(prefix)
    assert entries == []


async def test_a_usage_error_exits_2() -> None:
    done = await asyncio.to_thread(run_cli, "set", "rooms.max_size")
    assert done.returncode == 2
    assert "usage:" in done.stderr


async def test_etcd_unreachable_exits_1() -> None:
    (port,) = free_ports(1)
    done = await asyncio.to_thread(
        run_cli, "set", "rooms.max_size", "3", "--etcd", f"http://127.0.0.1:{port}"
    )
    assert done.returncode == 1
    assert done.stderr.startswith("imserver config: etcd unreachable"), done.stderr
    done = await asyncio.to_thread(run_cli, "list")  # and no endpoint at all
    assert done.returncode == 1
    assert "no etcd endpoint" in done.stderr


async def test_stored_values_the_command_would_refuse_are_ignored_by_the_watchers(
    client: EtcdClient, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with Instance(client, prefix) as one:
        base = prefix + "/config/"
        bad = await client.put(base + "rooms.max_size", b'"big"')
        unknown = await client.put(base + "rooms.colour", b'"blue"')
        garbage = await client.put(base + "files.max_size", b"{nope")
        good = await client.put(base + "limits.rate_burst", b"7")
        await until(lambda: one.live.rate_burst.value == 7, "the good value applied")
        assert one.live.room_max_size.value == 10000
        assert one.live.upload_max_size.value == 20 * 1024 * 1024
        assert one.live.revision == good
        assert (
            f"config: ignoring {base}rooms.max_size at revision {bad}: "
            "invalid value 'big' for rooms.max_size" in caplog.text
        )
        assert f"config: ignoring {base}rooms.colour at revision {unknown}" in caplog.text
        assert f"config: ignoring {base}files.max_size at revision {garbage}" in caplog.text
        text = one.metrics.render().decode()
        assert 'imserver_config_changes_total{name="rooms.max_size",result="ignored"} 1.0' in text

        await client.put(base + "rooms.max_size", b"5")
        await until(lambda: one.live.room_max_size.value == 5, "a good value after a bad one")
        deleted = await client.delete(base + "rooms.max_size")
        await until(lambda: one.live.room_max_size.value == 10000, "deleted: the configured value")
        assert f"at revision {deleted}" in caplog.text
