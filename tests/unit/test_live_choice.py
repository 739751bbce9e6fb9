"""The ``live`` setting: memory by default, with no Redis library imported; ``redis``
builds the Redis bus and presence stores; the ``[redis]`` settings are checked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from imserver.utils.config import load_config
from imserver.utils.errors import BadRequest


def test_the_default_is_memory_and_imports_no_redis() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from imserver.core.live_backends import live_backends
        from imserver.core import server  # the process around it, too
        from imserver.utils.config import Config

        async def main():
            live = await live_backends(Config())
            print(type(live.bus).__name__, type(live.online).__name__,
                  type(live.devices).__name__, live.close)
        asyncio.run(main())
        print(sorted(m for m in sys.modules if m == "redis" or m.startswith("redis.")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["MemoryLiveBus MemoryOnlineStore MemoryOnlineDevices None", "[]"]


def test_redis_settings_come_from_the_environment_and_are_checked() -> None:
    config = load_config(
        environ={
            "IMSERVER_LIVE": "redis",
            "IMSERVER_REDIS__URL": "redis://10.0.0.5:6380/2",
            "IMSERVER_REDIS__PREFIX": "east:",
            "IMSERVER_REDIS__HEARTBEAT": "2",
            "IMSERVER_REDIS__TTL": "6",
        }
    )
    assert config.live == "redis"
    r = config.redis
    assert (r.url, r.prefix, r.heartbeat, r.ttl) == ("redis://10.0.0.5:6380/2", "east:", 2.0, 6.0)
    with pytest.raises(BadRequest, match=r"redis\.heartbeat must be below redis\.ttl"):
        load_config(environ={"IMSERVER_REDIS__HEARTBEAT": "15"})
    with pytest.raises(BadRequest, match=r"\$.live"):
        load_config(environ={"IMSERVER_LIVE": "etcd"})
    with pytest.raises(BadRequest, match=r"\$.redis.ttl"):
        load_config(environ={"IMSERVER_REDIS__TTL": "0"})


async def test_redis_unreachable_at_start_is_unavailable() -> None:
    from imserver.core.live_backends import live_backends
    from imserver.testing.process import free_ports
    from imserver.utils.errors import Unavailable

    port = free_ports(1)[0]  # nothing listens there
    config = load_config(
        environ={"IMSERVER_LIVE": "redis", "IMSERVER_REDIS__URL": f"redis://127.0.0.1:{port}/0"}
    )
    with pytest.raises(Unavailable, match="redis unreachable"):
        await live_backends(config)
