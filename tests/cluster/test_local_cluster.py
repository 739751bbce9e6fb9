"""``imserver cluster up|status|logs|down`` end to end, and the cross-gateway test
through the running cluster: a user, a DM, a room message and a file made through
gateway 1 are visible through gateway 2, live and by history or download, and through
HAProxy's one client port.

The cluster runs on a fresh PostgreSQL database (dropped after), the machine's Redis
and RabbitMQ under a prefix of this module's own (deleted after), with etcd and
HAProxy of its own. A missing server or binary skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import databases as dbs
import pytest
from etcd_server import require_etcd
from test_haproxy import _require_haproxy

from imserver.client import Client, HttpClient
from imserver.cluster.local import ClusterState, load_state
from imserver.core.events import GROUPS
from imserver.testing import redis as redis_testing
from imserver.utils.config import EventsConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
import rabbit

PASSWORD = "correct horse battery"


def cluster(*args: str) -> subprocess.CompletedProcess[str]:
    """``imserver cluster ARGS``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "imserver", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@dataclass
class Running:
    """The cluster of the module: its directory, state and ``up``'s output."""

    root: Path
    state: ClusterState
    up_output: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    require_etcd()
    _require_haproxy()
    redis_url = redis_testing.shared_url()
    why = redis_testing.reachable(redis_url)
    if why is not None:
        dbs.unavailable(why)
    asyncio.run(rabbit.reachable())
    root = tmp_path_factory.mktemp("cluster") / "c"
    database = dbs.create_database("postgresql", "cluster")
    dbs.drop_database(database)  # `up` creates it: the name is fresh
    prefix = rabbit.new_prefix()
    try:
        up = cluster(
            "up",
            "--dir",
            str(root),
            "--gateways",
            "2",
            "--message",
            "2",
            "--database",
            database.url,
            "--redis",
            redis_url,
            "--rabbitmq",
            rabbit.URL,
            "--prefix",
            prefix,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        yield Running(root, load_state(root), up.stdout)
    finally:
        if (root / "cluster.json").exists():
            cluster("down", "--dir", str(root))
        dbs.drop_database(database)
        redis_testing.delete_prefix(redis_url, prefix + ":")
        asyncio.run(rabbit.delete_topology(prefix, GROUPS, EventsConfig().backoff))


def test_up_prints_the_one_client_url_and_status_shows_every_process(running: Running) -> None:
    state = running.state
    url = f"ws://127.0.0.1:{state.frontend_http}/ws"
    assert f"clients:    {url}" in running.up_output
    names = sorted(m.name for m in state.members)
    assert names == sorted(
        [
            "gateway-1",
            "gateway-2",
            "message-1",
            "message-2",
            "user-1",
            "room-1",
            "file-1",
            "notification-1",
        ]
    )
    shown = cluster("status", "--dir", str(running.root))
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line}
    for name in names:
        assert rows[name][0] == "ready", shown.stdout
    assert rows["etcd"][0] == "up"
    assert rows["haproxy"][:4] == ["up", "gateways", "UP:", "gateway-1,"], shown.stdout
    assert rows["haproxy"][4] == "gateway-2"
    assert url in shown.stdout

    logged = cluster("logs", "--dir", str(running.root), "gateway-1", "-n", "400")
    assert logged.returncode == 0
    assert logged.stdout.startswith("== gateway-1 ")
    assert "--services gateway" in logged.stdout
    assert "imserver listening" in logged.stdout
    assert "message-1" not in logged.stdout
    missing = cluster("logs", "--dir", str(running.root), "gateway-9")
    assert missing.returncode == 2
    assert "no process 'gateway-9'" in missing.stderr


async def test_what_gateway_1_makes_is_visible_through_gateway_2(running: Running) -> None:
    members = {m.name: m for m in running.state.members}
    gw1 = f"ws://127.0.0.1:{members['gateway-1'].http_port}/ws"
    gw2 = f"ws://127.0.0.1:{members['gateway-2'].http_port}/ws"
    http1 = f"http://127.0.0.1:{members['gateway-1'].http_port}"
    http2 = f"http://127.0.0.1:{members['gateway-2'].http_port}"
    tag = os.urandom(3).hex()

    # Both users registered through gateway 1; the room made there, before anyone
    # connects (each gateway follows a user's rooms from the login).
    async with await Client.connect(gw1) as c:
        alice_user = (await c.register(f"alice_{tag}", PASSWORD))["id"]
    async with await Client.connect(gw1) as c:
        bob_user = (await c.register(f"bob_{tag}", PASSWORD))["id"]
    async with HttpClient(http1) as http:
        token = (await http.request("login", username=f"alice_{tag}", password=PASSWORD))["token"]
        made = await http.request("room.create", token=token, name="Both", members=[bob_user])
    room = f"r:{made['room']['id']}"

    alice = await Client.connect(gw1)
    bob = await Client.connect(gw2)
    # Bob's session goes through HAProxy's one client port, too.
    carol = await Client.connect(running.state.client_url)
    try:
        await alice.login(f"alice_{tag}", PASSWORD)
        await bob.login(f"bob_{tag}", PASSWORD)  # the user made through gateway 1
        await carol.login(f"bob_{tag}", PASSWORD)
        assert bob.user_id == bob_user and alice.user_id == alice_user

        dm = Client.direct_conv(alice.user_id, bob.user_id)
        sent = await alice.send_message(dm, "dm through 1")
        got = await bob.next_event("msg", match=lambda e: e.get("conv") == dm, timeout=10)
        assert (got["seq"], got["body"]) == (sent["seq"], "dm through 1")
        got = await carol.next_event("msg", match=lambda e: e.get("conv") == dm, timeout=10)
        assert got["seq"] == sent["seq"]

        sent_room = await alice.send_message(room, "room through 1")
        got = await bob.next_event("msg", match=lambda e: e.get("conv") == room, timeout=10)
        assert (got["seq"], got["body"]) == (sent_room["seq"], "room through 1")

        data = b"cluster file " + os.urandom(4096)
        async with HttpClient(http1, token=alice.token) as http:
            status, _, raw = await http.post(
                "/api/v1/files",
                data,
                params={"conv": room, "name": "c.bin"},
                headers={"Content-Type": "application/octet-stream"},
            )
        assert status == 200, raw
        info: dict[str, Any] = json.loads(raw)["file"]
        async with HttpClient(http2, token=bob.token) as http:
            status, _, body = await http.get(info["url"])
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()

        # By history, through gateway 2 and through HAProxy.
        for reader in (bob, carol):
            page = await reader.history(dm)
            assert [m["body"] for m in page["messages"]] == ["dm through 1"]
            page = await reader.history(room)
            assert "room through 1" in [m["body"] for m in page["messages"]]
        found = await bob.request("user.get", {"user": alice.user_id})
        assert found["user"]["username"] == f"alice_{tag}"
    finally:
        for client in (alice, bob, carol):
            await client.close()


def test_down_stops_every_process(running: Running) -> None:
    state = running.state
    pids = [state.etcd_pid, state.haproxy_pid, *(m.pid for m in state.members)]
    assert all(_alive(pid) for pid in pids)
    stopped = cluster("down", "--dir", str(running.root))
    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in pids if _alive(pid)] == []
    assert not (running.root / "cluster.json").exists()
    again = cluster("status", "--dir", str(running.root))
    assert again.returncode == 2
    assert "no cluster" in again.stderr
