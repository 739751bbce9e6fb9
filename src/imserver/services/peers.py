"""How a service reaches another service it calls: a lookup, asked on every call.

Some services call each other (the room service posts system messages through the
message service, which asks the room service who the members of a room are; the file
service and the message service likewise), so one of each pair cannot be handed the
other when it is built. Instead of finishing the wiring afterwards by mutating the
services, the one built first receives a :data:`Peer`: a function that answers the
other service when called. It is the embedded stand-in for service discovery — the
composition root (:mod:`imserver.core.embedded`) answers from the services it has
built, and answers ``unavailable`` before the service exists; a distributed mode
answers with a gRPC client of an instance found in its registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias, TypeVar

T = TypeVar("T")

Peer: TypeAlias = Callable[[], T]
"""The service of type ``T`` that a call should go to now."""
