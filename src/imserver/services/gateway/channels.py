"""Which live-bus channels a gateway follows, and to which of its users each
publication goes.

The gateway subscribes the personal channel ``u:<user>`` of every user with an
attached session, and the channel ``r:<room>`` of every room one of them is a
member of (see :mod:`imserver.storage.bus` for what each channel carries). Both are
counted by users: a channel is subscribed when its first local user arrives and
unsubscribed when its last one goes. A user's rooms are loaded when their first
session attaches (:meth:`Channels.add_rooms`, from the room directory's
``rooms_of``) and then follow the membership changes published on the room's
channel and the user's own:

* A room message that adds users (``joined``) goes to the members after they are
  added, one that removes users (``left``) before they are removed, so a
  membership change takes effect exactly at its message's seq, in publication
  order.
* The same message also comes on the personal channel of each user it adds or
  removes. A joiner whose room is already followed for them got it on the room's
  channel; otherwise it is delivered from there and the room is followed from its
  seq on. A user removed from a room not followed for them (a leave that raced the
  loading of their rooms) is remembered, so the loaded list leaves it out.

Gaps: a positioned publication (a stored message) that does not follow the last
seq of its conversation on that channel means the bus lost (or repeated)
publications; every local user that channel serves is handed to ``resync``. A loss
the positions cannot show (the bus's connection to its broker broke, so even the
last message of a conversation may be gone) comes from the bus's ``on_lost``
listener: once the channels are subscribed again, every local user they serve is
handed to ``resync``, and their positions start afresh.

This class knows users, not sessions: the hub turns users into sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from imserver.protocol.convs import room_conv
from imserver.protocol.events import Msg
from imserver.storage.bus import LiveBus, Publication, room_channel, user_channel
from imserver.utils.ids import RoomId

logger = logging.getLogger(__name__)

Deliver = Callable[[Iterable[str], Publication], None]
"""Write a publication's event to the sessions of these users (honouring its
exclusions)."""
Resync = Callable[[Iterable[str]], None]
"""Make these users' sessions catch up after a gap."""


class Channels:
    """The live-bus subscriptions of one gateway, and the routing of publications
    to its users."""

    def __init__(self, bus: LiveBus, deliver: Deliver, resync: Resync) -> None:
        self._bus = bus
        self._deliver = deliver
        self._resync = resync
        self._user_channels: dict[str, str] = {}
        """personal channel -> its local user."""
        self._rooms: dict[str, dict[str, None]] = {}
        """room channel -> local users who are members (in join order)."""
        self._rooms_of: dict[str, set[str]] = {}
        """local user -> room channels followed for them."""
        self._loading: dict[str, set[str]] = {}
        """local user whose rooms are loading -> room channels they left meanwhile."""
        self._positions: dict[str, dict[str, int]] = {}
        """channel -> conversation -> last seq seen."""
        self.gaps = 0
        """Gaps seen on the live bus since start."""
        self.losses = 0
        """Times the live bus reported lost publications since start."""
        bus.on_lost(self.on_lost)

    # --- users ------------------------------------------------------------------------

    def add_user(self, user: str) -> None:
        """A user's first session attached: follow their channel; their rooms follow
        with :meth:`add_rooms`."""
        if user in self._rooms_of:
            return
        self._rooms_of[user] = set()
        self._loading[user] = set()
        channel = user_channel(user)
        self._user_channels[channel] = user
        self._bus.subscribe(channel, self.on_publication)

    def add_rooms(self, user: str, rooms: Iterable[RoomId]) -> None:
        """Follow ``rooms`` (the user's rooms, loaded after :meth:`add_user`) for
        ``user``, but those they left while the list was loading."""
        left = self._loading.pop(user, None)
        if left is None:  # removed meanwhile, or already loaded
            return
        for room in rooms:
            channel = room_channel(room_conv(room))
            if channel not in left:
                self._join(user, channel)

    def remove_user(self, user: str) -> None:
        """A user's last session detached: stop following what was theirs."""
        rooms = self._rooms_of.get(user)
        if rooms is None:
            return
        for channel in list(rooms):
            self._leave(user, channel)
        del self._rooms_of[user]
        self._loading.pop(user, None)
        channel = user_channel(user)
        del self._user_channels[channel]
        self._positions.pop(channel, None)
        self._bus.unsubscribe(channel, self.on_publication)

    def room_users(self, room: RoomId) -> list[str]:
        """The local users ``room``'s messages go to."""
        return list(self._rooms.get(room_channel(room_conv(room)), ()))

    # --- room subscriptions -----------------------------------------------------------

    def _join(self, user: str, channel: str) -> None:
        """Deliver ``channel`` (a room's) to ``user``; subscribe it if it is new here."""
        rooms = self._rooms_of.get(user)
        if rooms is None or channel in rooms:
            return
        members = self._rooms.get(channel)
        if members is None:
            members = self._rooms[channel] = {}
            self._bus.subscribe(channel, self.on_publication)
        members[user] = None
        rooms.add(channel)

    def _leave(self, user: str, channel: str) -> None:
        """Stop delivering ``channel`` to ``user``; unsubscribe it after the last one."""
        rooms = self._rooms_of.get(user)
        if rooms is None or channel not in rooms:
            return
        rooms.discard(channel)
        members = self._rooms.get(channel)
        if members is None:
            return
        members.pop(user, None)
        if not members:
            del self._rooms[channel]
            self._positions.pop(channel, None)
            self._bus.unsubscribe(channel, self.on_publication)

    # --- publications -----------------------------------------------------------------

    def on_publication(self, channel: str, pub: Publication) -> None:
        """Route one publication of a subscribed channel (the live bus's handler)."""
        members = self._rooms.get(channel)
        if members is not None:
            if pub.seq is not None:
                self._check_position(channel, pub)
            if pub.joined:
                for joiner in pub.joined:
                    self._join(joiner, channel)
            self._deliver(members, pub)
            if pub.left:
                for leaver in pub.left:
                    self._leave(leaver, channel)
            return
        user = self._user_channels.get(channel)
        if user is None:  # unsubscribed meanwhile
            return
        if pub.seq is not None:
            self._check_position(channel, pub)
        conv = pub.conv
        if conv is not None and conv.startswith("r:"):
            self._room_notice(user, room_channel(conv), pub)
            return
        self._deliver((user,), pub)

    def on_lost(self, channels: Sequence[str]) -> None:
        """The bus may have lost publications of ``channels`` (the live bus's lost
        listener): resync every local user they serve."""
        users: dict[str, None] = {}
        for channel in channels:
            if channel not in self._rooms and channel not in self._user_channels:
                continue  # another subscriber's
            self._positions.pop(channel, None)
            user = self._user_channels.get(channel)
            if user is not None:
                users[user] = None
            for member in self._rooms.get(channel, ()):
                users[member] = None
        if users:
            self.losses += 1
            logger.warning("live bus lost publications: %d local users resync", len(users))
            self._resync(list(users))

    def _room_notice(self, user: str, channel: str, pub: Publication) -> None:
        """A room message on ``user``'s own channel: an invitation, or a membership
        change of theirs, which the room's channel may already have delivered."""
        rooms = self._rooms_of.get(user)
        if rooms is None:
            return
        if user in pub.joined:
            if channel in rooms:  # delivered on the room's channel
                return
            self._join(user, channel)
            event = pub.event
            if isinstance(event, Msg):
                self._positions.setdefault(channel, {})[event.conv] = event.seq
        elif user in pub.left:
            if channel not in rooms:  # delivered on the room's channel, or loading
                loading = self._loading.get(user)
                if loading is not None:
                    loading.add(channel)
                return
            self._deliver((user,), pub)
            self._leave(user, channel)
            return
        self._deliver((user,), pub)

    def _check_position(self, channel: str, pub: Publication) -> None:
        """Record a positioned publication; after a gap, resync the channel's users."""
        seq = pub.seq
        conv = pub.conv
        assert seq is not None and conv is not None
        convs = self._positions.get(channel)
        if convs is None:
            convs = self._positions[channel] = {}
        last = convs.get(conv)
        convs[conv] = seq
        if last is None or seq == last + 1:
            return
        self.gaps += 1
        logger.warning("live bus gap on %s: %s seq %d after %d", channel, conv, seq, last)
        user = self._user_channels.get(channel)
        self._resync((user,) if user is not None else list(self._rooms.get(channel, ())))
