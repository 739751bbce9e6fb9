"""The config centre end to end: a real ``imserver serve`` watching a real etcd
applies ``imserver config set`` without a restart."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from etcd_server import require_etcd
from metrics import metric_reaches
from refusals import refused

from imserver.client import HttpClient
from imserver.testing.etcd import EtcdServer
from imserver.testing.process import free_ports

if TYPE_CHECKING:
    from conftest import Clients, ServerFactory


def config_set(etcd: EtcdServer, prefix: str, name: str, value: str) -> int:
    """``imserver config set NAME VALUE``; the revision it printed."""
    command = [sys.executable, "-m", "imserver", "config", "set", name, value]
    done = subprocess.run(
        [*command, "--etcd", etcd.url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(rf"{re.escape(name)} = \S+ \(revision (\d+)\)\n", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


@pytest.mark.embedded_only("points the one server at an etcd of the test's own")
async def test_a_room_size_set_in_etcd_applies_without_a_restart(
    etcd: EtcdServer, server_factory: ServerFactory, clients: Clients
) -> None:
    prefix = f"/imtest-{secrets.token_hex(4)}"
    server = server_factory({"etcd": {"endpoints": [etcd.url], "prefix": prefix}})
    a, b, c, d = await asyncio.gather(*(clients.user(server, n) for n in "abcd"))
    room = (await a.request("room.create", name="growing", public=True))["room"]
    await b.request("room.join", room=room["id"])
    await c.request("room.join", room=room["id"])  # 3 members, far below the default

    revision = await asyncio.to_thread(config_set, etcd, prefix, "rooms.max_size", "3")
    async with HttpClient(server.http_url) as http:
        await metric_reaches(http, "imserver_config_revision", lambda v: v == revision)
    err = await refused(d.request("room.join", room=room["id"]), "forbidden")
    assert err.message == "room is full (at most 3 members)"
    assert "config: rooms.max_size = 3 at revision" in server.logs()

    await asyncio.to_thread(config_set, etcd, prefix, "rooms.max_size", "4")
    async with HttpClient(server.http_url) as http:
        await metric_reaches(http, "imserver_config_revision", lambda v: v > revision)
    joined = await d.request("room.join", room=room["id"])
    assert joined["room"]["members"] == 4
    assert server.starts == 1  # the same process all along


@pytest.mark.embedded_only("points the one server at an etcd of the test's own and kills it")
async def test_a_server_starts_with_etcd_down_and_applies_the_stored_values_later(
    tmp_path: Path, server_factory: ServerFactory, clients: Clients
) -> None:
    require_etcd()
    etcd = EtcdServer(tmp_path / "etcd-later")
    etcd.client_port, etcd.peer_port = free_ports(2)
    prefix = f"/imtest-{secrets.token_hex(4)}"
    server = server_factory({"etcd": {"endpoints": [etcd.url], "prefix": prefix}})
    try:
        a, b, c = await asyncio.gather(*(clients.user(server, n) for n in "abc"))
        room = (await a.request("room.create", name="later", public=True))["room"]
        assert "etcd did not answer within" in server.logs()
        await asyncio.to_thread(etcd.start)
        revision = await asyncio.to_thread(config_set, etcd, prefix, "rooms.max_size", "2")
        async with HttpClient(server.http_url) as http:
            await metric_reaches(
                http, "imserver_config_revision", lambda v: v == revision, within=20.0
            )
        await b.request("room.join", room=room["id"])
        err = await refused(c.request("room.join", room=room["id"]), "forbidden")
        assert err.message == "room is full (at most 2 members)"
    finally:
        etcd.kill()
