"""A circuit breaker per instance: a pure state machine, its transitions a table.

States and what moves them (``[etcd] breaker_*`` settings)::

    CLOSED ──TRIP (breaker_failures consecutive failures)──▶ OPEN
    OPEN ──COOLED (breaker_cooldown seconds since it opened, at the next call)──▶ HALF_OPEN
    HALF_OPEN ──FAILURE (of a probe)──▶ OPEN            (the cool-down starts again)
    HALF_OPEN ──RECOVERED (breaker_probes probes succeeded)──▶ CLOSED

CLOSED lets every call through. OPEN refuses every call. HALF_OPEN lets at most
``probes`` calls through at a time and refuses the others. Consecutive failures were
chosen over a failure rate: the calls behind a breaker are the calls of one client to
one instance, often few per second, where a rate over a window says little until the
window fills; N failures in a row is what an instance that died or hangs produces,
and one success in between means it still answers.

:data:`TRANSITIONS` is the whole machine: ``{state: {signal: next state}}``. A
signal with no entry in the current state is a bug in the caller and raises
:class:`BreakerError` naming both. Results that arrive in OPEN (calls let through
before it opened) change nothing. The clock is injected (``time.monotonic`` by
default) so the tests walk every path without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    """The breaker's states; the value is what logs and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Signal(enum.Enum):
    """What happened: a call's outcome, or the cool-down running out."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRIP = "trip"
    """A failure that reaches the threshold."""
    COOLED = "cooled"
    RECOVERED = "recovered"
    """A probe's success that completes the required count."""


TRANSITIONS: dict[State, dict[Signal, State]] = {
    State.CLOSED: {
        Signal.SUCCESS: State.CLOSED,
        Signal.FAILURE: State.CLOSED,
        Signal.TRIP: State.OPEN,
    },
    State.OPEN: {
        Signal.COOLED: State.HALF_OPEN,
        Signal.SUCCESS: State.OPEN,
        Signal.FAILURE: State.OPEN,
    },
    State.HALF_OPEN: {
        Signal.SUCCESS: State.HALF_OPEN,
        Signal.RECOVERED: State.CLOSED,
        Signal.FAILURE: State.OPEN,
    },
}
"""Every allowed transition (see the module docstring)."""

STATE_VALUES: dict[State, int] = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}
"""The number the state gauge shows."""


class BreakerError(RuntimeError):
    """A signal that the current state does not accept (a bug, never a call's outcome)."""


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The thresholds of every breaker of one client."""

    failures: int = 5
    cooldown: float = 5.0
    probes: int = 1

    def __post_init__(self) -> None:
        if self.failures < 1 or self.probes < 1 or self.cooldown <= 0:
            raise ValueError(f"invalid breaker policy {self}")


Listener = Callable[["Breaker", State, State], None]
"""Told of every state change: the breaker, the state left, the state entered."""


class Breaker:
    """One instance's breaker. Call :meth:`allow` before a call; report its outcome
    with exactly one :meth:`success` or :meth:`failure` when it was allowed."""

    __slots__ = (
        "_clock",
        "_failures",
        "_in_flight",
        "_listener",
        "_opened_at",
        "_successes",
        "name",
        "policy",
        "state",
    )

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        self.state = State.CLOSED
        self._clock = clock
        self._listener = listener
        self._failures = 0
        """Consecutive failures (CLOSED)."""
        self._successes = 0
        """Probes that succeeded (HALF_OPEN)."""
        self._in_flight = 0
        """Probes let through and not yet reported (HALF_OPEN)."""
        self._opened_at = 0.0

    def _fire(self, signal: Signal) -> None:
        try:
            new = TRANSITIONS[self.state][signal]
        except KeyError:
            raise BreakerError(
                f"breaker {self.name}: {signal.value} in {self.state.value}"
            ) from None
        old, self.state = self.state, new
        if new is old:
            return
        if new is State.OPEN:
            self._opened_at = self._clock()
        self._failures = self._successes = self._in_flight = 0
        if self._listener is not None:
            self._listener(self, old, new)

    def allow(self) -> bool:
        """Whether a call may go to the instance now (a probe slot is taken in
        HALF_OPEN)."""
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.policy.cooldown:
                return False
            self._fire(Signal.COOLED)
        if self.state is State.HALF_OPEN:
            if self._in_flight + self._successes >= self.policy.probes:
                return False
            self._in_flight += 1
        return True

    def available(self) -> bool:
        """Whether :meth:`allow` would let a call through now, without taking a slot."""
        if self.state is State.OPEN:
            return self._clock() - self._opened_at >= self.policy.cooldown
        if self.state is State.HALF_OPEN:
            return self._in_flight + self._successes < self.policy.probes
        return True

    def success(self) -> None:
        """An allowed call succeeded."""
        if self.state is State.HALF_OPEN:
            self._in_flight = max(0, self._in_flight - 1)
            self._successes += 1
            if self._successes >= self.policy.probes:
                self._fire(Signal.RECOVERED)
                return
        elif self.state is State.CLOSED:
            self._failures = 0
        self._fire(Signal.SUCCESS)

    def failure(self) -> None:
        """An allowed call failed (the instance did not answer, or answered
        ``unavailable``/``internal``; a refusal of the request itself is a success)."""
        if self.state is State.CLOSED:
            self._failures += 1
            if self._failures >= self.policy.failures:
                self._fire(Signal.TRIP)
                return
        self._fire(Signal.FAILURE)
