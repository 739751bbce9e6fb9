"""The call policy of every gRPC call between services: deadlines and retries.

- **A deadline on every call.** Unary calls get ``rpc.deadline`` per attempt; a
  server stream (a download's bytes) ``rpc.stream_deadline`` and a client stream (an
  upload) ``rpc.upload_deadline``, each for the whole call.
- **Retries only for idempotent methods**, the explicit set :data:`IDEMPOTENT`:
  reads, and writes that leave the same state however often they are applied
  (block, a mute, a monotonic read marker). Never a write that creates something
  or moves a counter (``send``, ``register``, ``login``, ``refresh``, a room's
  membership change, …). Streams are never retried.
- **Only transport failures are retried**: the peer unreachable, the connection
  lost, a deadline passed (:func:`imserver.rpc.status.is_transport_failure`). An
  answer of the service, an error included, is never retried.
- **Exponential backoff with full jitter**: before retry ``n`` (1, 2, …) the caller
  sleeps a uniform random time in ``[0, min(retry_backoff_max, retry_backoff ·
  2^(n-1))]``, at most ``rpc.retry_attempts`` attempts in all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from imserver.utils.config import RpcConfig

IDEMPOTENT: dict[str, frozenset[str]] = {
    "UserService": frozenset(
        {
            "authenticate",
            "logout",
            "get_user",
            "get_user_by_name",
            "get_users",
            "block",
            "unblock",
            "is_blocked",
            "blocked_pairs",
            "list_users",
            "is_admin",
            "granted_admins",
            "get_presence",
            "check",
        }
    ),
    "MessageService": frozenset(
        {
            "history",
            "convs",
            "mark",
            "search",
            "check_member",
            "referenced_files",
            "write_barrier",
            "direct_peers",
            "unread_totals",
            "conv_members",
            "stored_since",
            "check",
        }
    ),
    "RoomService": frozenset(
        {
            "get",
            "list",
            "members",
            "room_members",
            "room_role",
            "room_title",
            "rooms_of",
            "invitations_of",
            "listed_rooms",
            "check",
        }
    ),
    "FileService": frozenset({"open_file", "open_thumb", "file_refs", "check"}),
    "NotificationService": frozenset(
        {"registrations", "vapid_key", "mute", "set_level", "trace", "settle", "check"}
    ),
    "BroadcastService": frozenset(),
}
"""The methods of each API a client retries after a transport failure."""


@dataclass(frozen=True)
class CallPolicy:
    """Deadlines and retries of a client (from the ``[rpc]`` settings)."""

    deadline: float = 10.0
    stream_deadline: float = 300.0
    upload_deadline: float = 900.0
    retry_attempts: int = 3
    retry_backoff: float = 0.05
    retry_backoff_max: float = 2.0

    @classmethod
    def of(cls, config: RpcConfig) -> CallPolicy:
        """The policy the ``[rpc]`` section sets."""
        return cls(
            deadline=config.deadline,
            stream_deadline=config.stream_deadline,
            upload_deadline=config.upload_deadline,
            retry_attempts=config.retry_attempts,
            retry_backoff=config.retry_backoff,
            retry_backoff_max=config.retry_backoff_max,
        )

    def backoff(self, retry: int, rand: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.retry_backoff_max, self.retry_backoff * 2 ** (retry - 1))
        return (rand or random).uniform(0.0, ceiling)


def idempotent(api: str, method: str) -> bool:
    """Whether ``api.method`` may be retried after a transport failure."""
    return method in IDEMPOTENT.get(api, frozenset())
