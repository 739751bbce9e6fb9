"""The circuit breaker (discovery/breaker.py): its table, and every sequence of calls,
outcomes and clock steps up to a length, against a reference model written apart."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from imserver.discovery.breaker import (
    TRANSITIONS,
    Breaker,
    BreakerError,
    BreakerPolicy,
    Signal,
    State,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_table_names_every_state_and_only_its_own_signals() -> None:
    assert set(TRANSITIONS) == set(State)
    allowed = {
        State.CLOSED: {Signal.SUCCESS, Signal.FAILURE, Signal.TRIP},
        State.OPEN: {Signal.COOLED, Signal.SUCCESS, Signal.FAILURE},
        State.HALF_OPEN: {Signal.SUCCESS, Signal.RECOVERED, Signal.FAILURE},
    }
    for state, signals in allowed.items():
        assert set(TRANSITIONS[state]) == signals


@pytest.mark.parametrize(
    ("state", "signal"),
    [(state, signal) for state in State for signal in Signal if signal not in TRANSITIONS[state]],
)
def test_a_signal_missing_from_the_table_is_an_error_naming_it(
    state: State, signal: Signal
) -> None:
    breaker = Breaker(BreakerPolicy(), name="i1")
    breaker.state = state
    with pytest.raises(BreakerError, match=f"breaker i1: {signal.value} in {state.value}"):
        breaker._fire(signal)
    assert breaker.state is state


@dataclass
class Model:
    """What the breaker must do, written as plainly as possible."""

    failures: int
    cooldown: float
    probes: int
    state: str = "closed"
    streak: int = 0
    opened: float = 0.0
    in_flight: int = 0
    good: int = 0
    moves: list[tuple[str, str]] = field(default_factory=list)

    def _go(self, new: str, now: float) -> None:
        self.moves.append((self.state, new))
        self.state = new
        self.streak = self.in_flight = self.good = 0
        if new == "open":
            self.opened = now

    def allow(self, now: float) -> bool:
        if self.state == "open":
            if now - self.opened < self.cooldown:
                return False
            self._go("half_open", now)
        if self.state == "half_open":
            if self.in_flight + self.good >= self.probes:
                return False
            self.in_flight += 1
        return True

    def success(self, now: float) -> None:
        if self.state == "closed":
            self.streak = 0
        elif self.state == "half_open":
            self.in_flight = max(0, self.in_flight - 1)
            self.good += 1
            if self.good >= self.probes:
                self._go("closed", now)

    def failure(self, now: float) -> None:
        if self.state == "closed":
            self.streak += 1
            if self.streak >= self.failures:
                self._go("open", now)
        elif self.state == "half_open":
            self._go("open", now)


STEPS = ("allow", "success", "failure", "wait")


@pytest.mark.parametrize("probes", [1, 2])
def test_every_sequence_matches_the_model(probes: int) -> None:
    """Every sequence of 8 steps (allow, report a success or a failure, wait out the
    cool-down): the same answers, states and transitions as the model. Outcomes are
    reported only for allowed calls, as the balancer's callers do."""
    policy = BreakerPolicy(failures=2, cooldown=5.0, probes=probes)
    checked = 0
    for steps in itertools.product(STEPS, repeat=8):
        clock = Clock()
        moves: list[tuple[str, str]] = []

        def moved(
            _b: Breaker, old: State, new: State, moves: list[tuple[str, str]] = moves
        ) -> None:
            moves.append((old.value, new.value))

        breaker = Breaker(policy, clock=clock, listener=moved)
        model = Model(policy.failures, policy.cooldown, policy.probes)
        allowed = 0
        for step in steps:
            if step == "allow":
                got = breaker.allow()
                assert got == model.allow(clock.now), steps
                allowed += got
            elif step == "wait":
                clock.now += policy.cooldown
            elif allowed:
                allowed -= 1
                getattr(breaker, step)()
                getattr(model, step)(clock.now)
            assert breaker.state.value == model.state, steps
            assert breaker.available() == (
                model.state == "closed"
                or (model.state == "open" and clock.now - model.opened >= model.cooldown)
                or (model.state == "half_open" and model.in_flight + model.good < model.probes)
            ), steps
        assert moves == model.moves, steps
        checked += 1
    assert checked == len(STEPS) ** 8


def test_a_walk_through_every_state() -> None:
    clock = Clock()
    moves: list[tuple[State, State]] = []
    breaker = Breaker(
        BreakerPolicy(failures=3, cooldown=10.0, probes=2),
        clock=clock,
        listener=lambda _b, old, new: moves.append((old, new)),
    )
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.allow()
    breaker.success()  # a success in between: the streak starts over
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is State.OPEN
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow() and breaker.allow()  # two probes
    assert not breaker.allow()  # a third waits for their outcome
    assert breaker.state is State.HALF_OPEN
    breaker.success()
    breaker.failure()  # one probe failed: open again, the cool-down starts over
    assert breaker.state is State.OPEN
    clock.now += 10.0
    assert breaker.allow() and breaker.allow()
    breaker.success()
    breaker.success()
    assert breaker.state is State.CLOSED
    assert moves == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_a_policy_out_of_range_is_refused() -> None:
    for bad in ({"failures": 0}, {"probes": 0}, {"cooldown": 0.0}):
        with pytest.raises(ValueError, match="invalid breaker policy"):
            BreakerPolicy(**bad)  # type: ignore[arg-type]
