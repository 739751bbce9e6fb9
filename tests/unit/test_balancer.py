"""The balancer (discovery/balancer.py) on plain channel objects: round robin,
breakers taking instances out and back, channels opened and closed with the
registry, the metrics and logs of every breaker transition."""

from __future__ import annotations

import logging

import msgspec
import pytest

from imserver.discovery.balancer import Balancer, first_for
from imserver.discovery.breaker import BreakerPolicy, State
from imserver.discovery.etcd import Entry
from imserver.discovery.registry import Instance
from imserver.utils.errors import Unavailable
from imserver.utils.metrics import DiscoveryMetrics, Metrics

PREFIX = "/t/services/user/"


class Channel:
    """A channel as the balancer sees it: made for an address, closed once."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = 0

    async def close(self, grace: float | None = None) -> None:
        self.closed += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entries(*instances: tuple[str, str]) -> dict[str, Entry]:
    out = {}
    for revision, (name, address) in enumerate(instances, 1):
        record = Instance(service="user", instance=name, address=address, started=1.0)
        out[PREFIX + name] = Entry(PREFIX + name, msgspec.json.encode(record), revision)
    return out


def make(metrics: DiscoveryMetrics | None = None) -> tuple[Balancer, list[Channel], Clock]:
    made: list[Channel] = []
    clock = Clock()

    def factory(address: str) -> Channel:
        made.append(Channel(address))
        return made[-1]

    policy = BreakerPolicy(failures=2, cooldown=3.0, probes=1)
    return Balancer("user", factory, policy=policy, metrics=metrics, clock=clock), made, clock


async def test_round_robin_over_the_registered_instances() -> None:
    balancer, made, _ = make()
    balancer.update(entries(("a", "h:1"), ("b", "h:2"), ("c", "h:3")))
    picked = [balancer.pick().instance for _ in range(7)]
    assert picked == ["a", "b", "c", "a", "b", "c", "a"]
    assert [c.address for c in made] == ["h:1", "h:2", "h:3"]
    assert balancer.pick().channel is made[1]


async def test_nothing_registered_is_unavailable() -> None:
    balancer, _, _ = make()
    with pytest.raises(Unavailable, match="no instance of the user service is registered"):
        balancer.pick()


async def test_an_instance_that_leaves_is_dropped_and_its_channel_closed() -> None:
    balancer, made, _ = make()
    balancer.update(entries(("a", "h:1"), ("b", "h:2")))
    balancer.update(entries(("b", "h:2")))
    assert [balancer.pick().instance for _ in range(3)] == ["b", "b", "b"]
    await balancer.close()
    assert [c.closed for c in made] == [1, 1]


async def test_a_new_address_gets_a_new_channel() -> None:
    balancer, made, _ = make()
    balancer.update(entries(("a", "h:1")))
    balancer.update(entries(("a", "h:9")))
    assert balancer.pick().channel is made[1]
    assert made[1].address == "h:9"
    await balancer.close()
    assert [c.closed for c in made] == [1, 1]


async def test_an_unreadable_registration_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    balancer, _, _ = make()
    bad = {PREFIX + "x": Entry(PREFIX + "x", b"{not json", 5)}
    with caplog.at_level(logging.WARNING):
        balancer.update({**entries(("a", "h:1")), **bad})
    assert [balancer.pick().instance for _ in range(2)] == ["a", "a"]
    assert "ignoring the registration /t/services/user/x" in caplog.text


async def test_a_failing_instance_is_skipped_until_its_probe_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    balancer, _, clock = make(metrics.discovery)
    balancer.update(entries(("a", "h:1"), ("b", "h:2")))
    caplog.set_level(logging.INFO)
    for _ in range(2):  # a fails twice in a row: its breaker opens
        a = balancer.pick()
        assert a.instance == "a"
        a.failed()
        balancer.pick().succeeded()  # b
    assert balancer.endpoints[PREFIX + "a"].breaker.state is State.OPEN
    assert [balancer.pick().instance for _ in range(3)] == ["b", "b", "b"]
    clock.now += 3.0  # cooled: one probe goes to a
    probe = balancer.pick()
    assert probe.instance == "a"
    assert [balancer.pick().instance for _ in range(2)] == ["b", "b"]  # one probe at a time
    probe.succeeded()
    assert [balancer.pick().instance for _ in range(2)] == ["a", "b"]
    text = metrics.render().decode()
    assert 'imserver_breaker_state{instance="a",service="user"} 0.0' in text
    for old, new in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert (
            f'imserver_breaker_transitions_total{{from_state="{old}",instance="a",'
            f'service="user",to_state="{new}"}} 1.0'
        ) in text
    assert "breaker of user instance a: closed -> open" in caplog.text
    assert "breaker of user instance a: half_open -> closed" in caplog.text


async def test_every_breaker_open_is_unavailable() -> None:
    metrics = Metrics()
    balancer, _, _ = make(metrics.discovery)
    balancer.update(entries(("a", "h:1")))
    for _ in range(2):
        balancer.pick().failed()
    with pytest.raises(Unavailable, match="no instance of the user service can take calls"):
        balancer.pick()
    assert 'imserver_breaker_state{instance="a",service="user"} 2.0' in metrics.render().decode()


async def test_an_affinity_key_keeps_its_instance_and_moves_only_when_it_fails() -> None:
    balancer, _, clock = make()
    balancer.update(entries(("a", "h:1"), ("b", "h:2"), ("c", "h:3")))
    keys = [f"d:u{i}:v{i}" for i in range(60)]
    first = {key: balancer.pick(key).instance for key in keys}
    # The same key, the same instance, however many other picks come between.
    for _ in range(3):
        balancer.pick()
        assert {key: balancer.pick(key).instance for key in keys} == first
    # Spread over every instance, not all on one.
    assert set(first.values()) == {"a", "b", "c"}
    # first_for names the same instance from the registry keys alone.
    registry = [PREFIX + name for name in ("a", "b", "c")]
    assert {key: first_for(key, registry).removeprefix(PREFIX) for key in keys} == first
    # b's breaker opens: b's keys move, every other key stays where it was.
    for _ in range(2):
        balancer.endpoints[PREFIX + "b"].failed()
    moved = {key: balancer.pick(key).instance for key in keys}
    for key in keys:
        if first[key] == "b":
            assert moved[key] in ("a", "c")
        else:
            assert moved[key] == first[key]
    # b leaves the registry and comes back: its keys return to it.
    balancer.update(entries(("a", "h:1"), ("c", "h:3")))
    balancer.update(entries(("a", "h:1"), ("b", "h:2"), ("c", "h:3")))
    clock.now += 3.0
    assert {key: balancer.pick(key).instance for key in keys} == first
