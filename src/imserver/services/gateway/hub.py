"""The hub: which live sessions each user has, and fan-out of the live bus's
publications to them.

The hub follows, through :class:`~imserver.services.gateway.channels.Channels`,
the live-bus channels its users need (their personal channels and their rooms'),
which route each publication to local users; the hub writes it to their sessions.
A gap on a channel (publications the bus lost) is filled from the message service
(:meth:`_read`, ``history`` as one of the channel's users); only a gap that cannot
be filled, or a broken connection to the broker, closes the sessions it serves with
``closed {resync}``, and their clients recover as after any reconnect
(docs/protocol.md §4.12). The memory bus never loses one.

Fan-out invariants:

* An event is encoded at most once per codec and framed at most once per
  (transport, codec); every recipient session gets the same ``bytes`` object, also
  when one event comes on several channels (a direct message on both users').
* No task per recipient: a delivery is a loop of non-blocking writes into each
  session's bounded queue (its transport buffer).
* Publications are handled in the order the bus hands them over, and each is
  written to every recipient before the next is looked at, so a session sees a
  conversation's ``msg`` events in seq order.
* An event that cannot be encoded in one codec (a bug: values are checked when they
  arrive, see :mod:`imserver.protocol.values`) is logged and counted once and skipped
  for the sessions of that codec only; they see a seq gap and recover by ``history``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from imserver.protocol import ops
from imserver.protocol.codec import Codec, EncodedEvent
from imserver.protocol.events import Closed, Event
from imserver.protocol.models import Message
from imserver.services.gateway.channels import Channels
from imserver.services.gateway.session import Session
from imserver.services.message.api import MessageService
from imserver.storage.bus import LiveBus, Publication
from imserver.utils.errors import Unavailable
from imserver.utils.ids import ConvId, LoginId, RoomId, UserId
from imserver.utils.metrics import Metrics

logger = logging.getLogger(__name__)

RESYNC = "resync"
"""The ``closed`` reason of sessions whose channel skipped positions."""
FILL_PAGE = 200
"""Messages a fill reads per call (``history``'s most)."""


class _Framed:
    """One event's framed bytes, per (transport kind, codec), computed on first use;
    ``None`` for a codec that cannot encode the event."""

    __slots__ = ("cache", "encoded", "metrics")

    def __init__(self, encoded: EncodedEvent, metrics: Metrics) -> None:
        self.encoded = encoded
        self.metrics = metrics
        self.cache: dict[tuple[str, Codec], bytes | None] = {}

    def get(self, session: Session) -> bytes | None:
        key = (session.link.kind, session.codec)
        if key in self.cache:
            return self.cache[key]
        codec = session.codec
        data: bytes | None = None
        try:
            data = session.link.frame(self.encoded.for_codec(codec), codec)
        except Exception:
            event = self.encoded.event
            logger.exception("cannot encode a %s event in %s", type(event).__name__, codec.name)
            self.metrics.encode_failure("event", codec.name.lower())
        self.cache[key] = data
        return data


class Hub:
    """Live authenticated sessions, indexed by user and by login session, and the
    live bus's channels their users need."""

    def __init__(self, metrics: Metrics, bus: LiveBus, messages: MessageService) -> None:
        self._metrics = metrics
        self._messages = messages
        self._by_user: dict[UserId, dict[Session, None]] = {}
        self._by_login: dict[LoginId, dict[Session, None]] = {}
        self.channels = Channels(
            bus, self._deliver, self._resync, self._read, on_fill=metrics.bus_fills.inc
        )
        """The live-bus channels followed for the users attached here."""
        self._framed_event: Event | None = None
        self._framed: _Framed | None = None
        self.delivered = 0
        """Events written to sessions since start (a counter for metrics and benchmarks)."""

    # --- sessions ---------------------------------------------------------------------

    def attach(self, session: Session) -> bool:
        """Register an authenticated session; True if it is its user's first (the
        caller then loads the user's rooms and hands them to :meth:`add_rooms`)."""
        caller = session.caller
        assert caller is not None
        user = caller.user
        sessions = self._by_user.setdefault(user, {})
        first = not sessions
        sessions[session] = None
        self._by_login.setdefault(caller.login, {})[session] = None
        if first:
            self.channels.add_user(user)
        return first

    def add_rooms(self, user: UserId, rooms: Iterable[RoomId]) -> None:
        """Follow the rooms of ``user`` (loaded after their first session attached)."""
        self.channels.add_rooms(user, rooms)

    def detach(self, session: Session) -> bool:
        """Forget a session; True if it was its user's last."""
        caller = session.caller
        if caller is None:
            return False
        user = caller.user
        sessions = self._by_user.get(user)
        if sessions is None or session not in sessions:
            return False
        del sessions[session]
        logins = self._by_login.get(caller.login)
        if logins is not None:
            logins.pop(session, None)
            if not logins:
                del self._by_login[caller.login]
        if sessions:
            return False
        del self._by_user[user]
        self.channels.remove_user(user)
        return True

    def sessions_of(self, user: UserId) -> list[Session]:
        """The user's live sessions."""
        return list(self._by_user.get(user, ()))

    def sessions_of_login(self, login: LoginId) -> list[Session]:
        """The live sessions authenticated by one login session's tokens."""
        return list(self._by_login.get(login, ()))

    def all_sessions(self) -> Iterator[Session]:
        """Every authenticated live session."""
        for sessions in list(self._by_user.values()):
            yield from list(sessions)

    async def _read(self, user: str, conv: str, after: int) -> tuple[list[Message], bool]:
        """Stored messages of ``conv`` after ``after``, read as ``user`` (through one
        of their live sessions' identity): what a gap missed."""
        sessions = self._by_user.get(UserId(user))
        caller = next((s.caller for s in sessions or () if s.caller is not None), None)
        if caller is None:
            raise Unavailable(f"no live session of {user}")
        req = ops.History(conv=ConvId(conv), after=after, limit=FILL_PAGE)
        page = await self._messages.history(caller, req)
        return page.messages, page.has_more

    def _resync(self, users: Iterable[str]) -> None:
        """Close the sessions of ``users`` with ``resync``: the bus lost publications."""
        self._metrics.bus_gaps.inc()
        for user in list(users):
            for session in list(self._by_user.get(UserId(user), ())):
                session.close(RESYNC)

    def _close_login(self, users: Iterable[str], pub: Publication) -> None:
        """Close the sessions of ``users`` authenticated by the revoked login session."""
        reason = pub.event.reason if isinstance(pub.event, Closed) else "revoked"
        for user in users:
            for session in list(self._by_user.get(UserId(user), ())):
                caller = session.caller
                if caller is not None and caller.login == pub.close_login:
                    session.close(reason)

    def _deliver(self, users: Iterable[str], pub: Publication) -> None:
        """Write one event to the live sessions of ``users``.

        The hot loop of every fan-out (a room message visits every local member): the
        framed bytes of the last (transport, codec) seen are kept at hand, since nearly
        every session shares one, and nothing per recipient allocates.
        """
        if pub.close_login is not None:
            self._close_login(users, pub)
            return
        event = pub.event
        framed: _Framed | None = None
        exclude_session = pub.exclude_session
        exclude_user = pub.exclude_user
        by_user: dict[str, dict[Session, None]] = self._by_user  # type: ignore[assignment]
        last_kind: str | None = None
        last_codec: Codec | None = None
        data: bytes | None = b""
        count = 0
        for user in users:
            sessions = by_user.get(user)
            if not sessions or user == exclude_user:
                continue
            for session in sessions:
                if session.id == exclude_session:
                    continue
                kind = session.link.kind
                codec = session.codec
                if kind != last_kind or codec is not last_codec:
                    if framed is None:
                        # One event on several channels is encoded once.
                        if self._framed_event is event and self._framed is not None:
                            framed = self._framed
                        else:
                            framed = _Framed(EncodedEvent(event), self._metrics)
                            self._framed_event, self._framed = event, framed
                    data = framed.get(session)
                    last_kind, last_codec = kind, codec
                if data is None:
                    continue
                session.push(data)
                count += 1
        self.delivered += count
