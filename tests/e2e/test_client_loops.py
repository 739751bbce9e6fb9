"""The client library on uvloop, the loop the server and the benchmarks run on."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from conftest import PASSWORD, ServerProcess

from imserver.client import Client, TransportName

uvloop = pytest.importorskip("uvloop")


@pytest.mark.parametrize("transport", ["ws", "tcp"])
def test_client_registers_logs_in_and_pings_on_uvloop(
    shared_server: ServerProcess, transport: TransportName
) -> None:
    async def main() -> tuple[str, dict[str, object]]:
        loop_kind = type(asyncio.get_running_loop()).__module__
        client = await Client.connect(shared_server.target(transport), transport=transport)
        try:
            name = f"uv_{secrets.token_hex(4)}"
            await client.request("register", username=name, password=PASSWORD)
            data = await client.request("login", username=name, password=PASSWORD)
            assert data["user"]["username"] == name
            return loop_kind, await client.request("ping")
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop_kind, pong = runner.run(main())
    assert loop_kind.startswith("uvloop")
    assert pong == {}
