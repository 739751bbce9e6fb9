"""The balancer over real gRPC: two ``grpc.aio`` servers registered in a real etcd,
called through the channels the balancer makes, one stopped (its breaker opens, the
calls go to the other) and started again (a probe closes the breaker), one
deregistered (its channel is shut down)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
import pytest
from waiting import until

from imserver.discovery.balancer import InstanceEndpoint, ServiceUpstream
from imserver.discovery.breaker import BreakerPolicy, State
from imserver.discovery.etcd import EtcdClient
from imserver.discovery.registry import Registration
from imserver.testing.etcd import EtcdServer
from imserver.testing.process import free_ports
from imserver.utils.metrics import Metrics

PREFIX = "/imtest-grpc"
METHOD = "/imtest.Echo/Name"


async def serve(name: str, port: int) -> grpc.aio.Server:
    """A gRPC server answering METHOD with its name (raw bytes, no generated code)."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return name.encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "imtest.Echo", {"Name": grpc.unary_unary_rpc_method_handler(answer)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def call(upstream: ServiceUpstream) -> tuple[InstanceEndpoint, str | None]:
    """One call as a gRPC client makes it: pick, call with a deadline, report."""
    endpoint = upstream.pick()
    try:
        answer = await endpoint.channel.unary_unary(METHOD)(b"", timeout=1.0)
    except grpc.aio.AioRpcError:
        endpoint.failed()
        return endpoint, None
    endpoint.succeeded()
    return endpoint, bytes(answer).decode()


async def test_calls_follow_the_registry_and_the_breakers(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port_a, port_b = free_ports(2)
    servers = {"a": await serve("a", port_a), "b": await serve("b", port_b)}
    client = EtcdClient([etcd.url], timeout=1.0)
    regs = {
        name: Registration(
            client, prefix=PREFIX, service="echo", instance=name, address=f"127.0.0.1:{port}", ttl=5
        )
        for name, port in (("a", port_a), ("b", port_b))
    }
    metrics = Metrics()
    upstream = ServiceUpstream(
        client,
        prefix=PREFIX,
        service="echo",
        policy=BreakerPolicy(failures=2, cooldown=0.5, probes=1),
        metrics=metrics.discovery,
        retry_max=0.5,
    )
    try:
        for reg in regs.values():
            reg.start()
            assert await reg.wait_registered(10)
        upstream.start()
        await until(lambda: len(upstream.balancer.endpoints) == 2, "both instances seen")
        answers = [(await call(upstream))[1] for _ in range(4)]
        assert answers == ["a", "b", "a", "b"]  # round robin, each answering itself

        await servers["a"].stop(None)
        failed = 0
        while upstream.balancer.endpoints[regs["a"].key].breaker.state is not State.OPEN:
            endpoint, answer = await call(upstream)
            if endpoint.instance == "a":
                assert answer is None
                failed += 1
            else:
                assert answer == "b"
        assert failed == 2
        # Open: every call goes to b, none is lost to a.
        assert [(await call(upstream))[1] for _ in range(4)] == ["b"] * 4
        text = metrics.render().decode()
        assert 'imserver_breaker_state{instance="a",service="echo"} 2.0' in text

        servers["a"] = await serve("a", port_a)  # back on its address
        seen: set[tuple[str, str | None]] = set()

        def closed_again() -> bool:
            return upstream.balancer.endpoints[regs["a"].key].breaker.state is State.CLOSED

        async with asyncio.timeout(20):
            while not closed_again():  # after the cool-down, a probe finds it answering
                endpoint, answer = await call(upstream)
                seen.add((endpoint.instance, answer))
                await asyncio.sleep(0.05)
        # A probe may fail while the channel waits out its reconnect backoff: the
        # breaker opens again and a later probe closes it. b answers throughout.
        assert seen <= {("a", "a"), ("a", None), ("b", "b")}
        assert {(await call(upstream))[1] for _ in range(4)} == {"a", "b"}
        assert "breaker of echo instance a: half_open -> closed" in caplog.text

        channel_b = upstream.balancer.endpoints[regs["b"].key].channel
        await regs["b"].stop()
        await until(lambda: len(upstream.balancer.endpoints) == 1, "b left the registry")
        await until(
            lambda: channel_b.get_state() is grpc.ChannelConnectivity.SHUTDOWN, "b's channel closed"
        )
        assert [(await call(upstream))[1] for _ in range(3)] == ["a"] * 3
    finally:
        await upstream.stop()
        for reg in regs.values():
            await reg.stop()
        for server in servers.values():
            await server.stop(None)
        await client.close()
