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
seq of its conversation on that channel means the bus lost publications. The
missing messages are filled from the record: a task reads them (``read``, the
message service's ``history`` as a local user of the channel) and routes them in
seq order, then the publication that showed the gap, then those of the same
conversation that came meanwhile (held in a bounded buffer, :data:`HOLD_LIMIT`;
other conversations flow on). Filled room messages carry their membership change
(read from the system message's ``meta``), so joins and leaves take effect at
their seq as live ones do: a kicked user gets nothing after the kick. A join or
leave notice on a user's own channel that the followed room's channel lost is put
in that channel's seq order the same way (held, or starting a fill). A room first
followed from a notice on a user's own channel is filled the same way once the
subscription is in effect (``bus.settle()``), from the notice's seq on: what was
published during the subscription's round trip is not missed. Only a fill that
fails (the read fails, the buffer overflows, more than :data:`FILL_LIMIT` are
missing) hands the channel's local users to ``resync``.

While a conversation fills, its position is :data:`FILLING`, which no seq follows,
so the position check is all the hot path does: the fill is looked up only off
position. A publication at or below the position was delivered by a fill (it was
read before the bus brought it) and is dropped.

A loss the positions cannot show (the bus's connection to its broker broke, so even the
last message of a conversation may be gone) comes from the bus's ``on_lost``
listener: once the channels are subscribed again, every local user they serve is
handed to ``resync``, and their positions start afresh.

A position that starts afresh starts at the first publication it sees, its *floor*.
Publications of one conversation come in seq order from one writer, but not from
two: after its writer moved (a message instance failed, or came back), the old
writer's last publications can come after the new writer's first. Above the floor
that shows as a gap and is filled, and the late ones are then dropped as filled; one
below the floor was never routed here, and no position can say whether the
channel's sessions had it, so its local users are handed to ``resync``.

This class knows users, not sessions: the hub turns users into sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from imserver.protocol.convs import room_conv
from imserver.protocol.events import Msg
from imserver.protocol.models import Message
from imserver.storage.bus import LiveBus, Publication, room_channel, user_channel
from imserver.utils.ids import RoomId

logger = logging.getLogger(__name__)

Deliver = Callable[[Iterable[str], Publication], None]
"""Write a publication's event to the sessions of these users (honouring its
exclusions)."""
Resync = Callable[[Iterable[str]], None]
"""Make these users' sessions catch up after a gap."""
Read = Callable[[str, str, int], Awaitable[tuple[list[Message], bool]]]
"""``read(user, conv, after)``: the next stored messages of ``conv`` after seq
``after``, ascending, as ``user`` reads them, and whether more follow."""

FILLING = -2
"""The position of a conversation while it fills: no seq follows it."""
HOLD_LIMIT = 1000
"""Most publications of one conversation held while it fills."""
FILL_LIMIT = 1000
"""Most messages one fill reads; past it the channel's users resync instead."""


class _Fill:
    """Messages of one conversation of one channel being read from the record."""

    __slots__ = ("channel", "conv", "held", "last", "readers", "settle", "task")

    def __init__(
        self, channel: str, conv: str, last: int, readers: list[str], *, settle: bool
    ) -> None:
        self.channel = channel
        self.conv = conv
        self.last = last
        """The last seq delivered."""
        self.readers = readers
        """Local users who may read the conversation (tried in order, then the
        room's local members of the moment)."""
        self.settle = settle
        """Await the bus's subscriptions first (a newly followed room)."""
        self.held: list[Publication] = []
        """Publications of the conversation that came meanwhile, in arrival order."""
        self.task: asyncio.Task[None] | None = None


class Channels:
    """The live-bus subscriptions of one gateway, and the routing of publications
    to its users."""

    def __init__(
        self,
        bus: LiveBus,
        deliver: Deliver,
        resync: Resync,
        read: Read,
        on_fill: Callable[[], None] | None = None,
    ) -> None:
        self._bus = bus
        self._on_fill = on_fill
        """Called for every gap filled (for metrics)."""
        self._deliver = deliver
        self._resync = resync
        self._read = read
        self._fills: dict[tuple[str, str], _Fill] = {}
        """(channel, conversation) -> its fill in flight."""
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
        self._floors: dict[tuple[str, str], int] = {}
        """(channel, conversation) -> the seq its position started at (see the module
        docstring): a publication below it was never routed here."""
        self.gaps = 0
        """Gaps seen on the live bus since start."""
        self.fills = 0
        """Gaps filled (what the bus missed delivered from the record) since start."""
        self.filled = 0
        """Messages those fills delivered."""
        self.failed_fills = 0
        """Fills that failed (their channel's users resynced) since start."""
        self.losses = 0
        """Times the live bus reported lost publications since start."""
        self.late = 0
        """Publications that came below their position's floor (their users resynced)."""
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
        self._forget(channel)
        self._drop_fills(channel)
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
            self._forget(channel)
            self._drop_fills(channel)
            self._bus.unsubscribe(channel, self.on_publication)

    # --- publications -----------------------------------------------------------------

    def on_publication(self, channel: str, pub: Publication) -> None:
        """Route one publication of a subscribed channel (the live bus's handler)."""
        members = self._rooms.get(channel)
        if members is not None:
            if pub.seq is not None and self._check_position(channel, pub):
                return
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
        if pub.seq is not None and self._check_position(channel, pub):
            return
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
            self._forget(channel)
            self._drop_fills(channel)
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
        event = pub.event
        if (
            isinstance(event, Msg)
            and channel in self._rooms
            and (
                (user in pub.joined and channel not in rooms)
                or (user in pub.left and channel in rooms)
            )
        ):
            # The room's channel is followed here but did not bring this change. If
            # its position is behind the change, it lost it: the change belongs in
            # that channel's seq order, with the messages before it (a kicked user
            # gets those) and after it. (At or past the position, the channel was
            # subscribed only after the change: it takes effect here and now.)
            convs = self._positions.setdefault(channel, {})
            fill = self._fills.get((channel, event.conv))
            last = fill.last if fill is not None else convs.get(event.conv)
            if last is not None and event.seq > last:
                positioned = Publication(
                    event=event, conv=event.conv, seq=event.seq, joined=pub.joined, left=pub.left
                )
                if fill is not None:
                    self._off_position(channel, convs, positioned, event.seq, FILLING)
                elif event.seq == last + 1:
                    convs[event.conv] = event.seq
                    self._route(channel, positioned)
                else:
                    self._off_position(channel, convs, positioned, event.seq, last)
                return
        if user in pub.joined:
            if channel in rooms:  # delivered on the room's channel
                return
            new = channel not in self._rooms
            self._join(user, channel)
            if isinstance(event, Msg):
                convs = self._positions.setdefault(channel, {})
                if new and not self._bus.subscribes_at_once:
                    # What the room's channel brings during the subscription's round
                    # trip may be missed: fill from here once it is in effect.
                    convs[event.conv] = FILLING
                    self._floors.setdefault((channel, event.conv), event.seq)
                    fill = _Fill(channel, event.conv, event.seq, [user], settle=True)
                    self._start(fill)
                else:
                    self._start_at(channel, convs, event.conv, event.seq)
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

    def _check_position(self, channel: str, pub: Publication) -> bool:
        """Record a positioned publication; True when it is not to be routed now
        (held while its conversation fills, or already filled)."""
        seq = pub.seq
        conv = pub.conv
        assert seq is not None and conv is not None
        convs = self._positions.get(channel)
        if convs is None:
            convs = self._positions[channel] = {}
        last = convs.get(conv)
        if last is None:
            self._floors[(channel, conv)] = seq
            convs[conv] = seq
            return False
        if seq == last + 1:
            convs[conv] = seq
            return False
        return self._off_position(channel, convs, pub, seq, last)

    def _start_at(self, channel: str, convs: dict[str, int], conv: str, seq: int) -> None:
        """Start ``conv``'s position at ``seq`` unless it has one."""
        if conv not in convs:
            convs[conv] = seq
            self._floors[(channel, conv)] = seq

    def _forget(self, channel: str) -> None:
        """Drop ``channel``'s positions: its next publications start afresh."""
        convs = self._positions.pop(channel, None)
        for conv in convs or ():
            self._floors.pop((channel, conv), None)

    def _below_floor(self, channel: str, conv: str, seq: int) -> None:
        """A publication below its position's floor (see the module docstring): the
        channel's users resync, and the conversation's position starts afresh."""
        self.late += 1
        floor = self._floors.pop((channel, conv), None)
        logger.warning(
            "live bus: %s seq %d on %s came after its position started at %s; resync",
            conv,
            seq,
            channel,
            floor,
        )
        fill = self._fills.pop((channel, conv), None)
        if fill is not None and fill.task is not None and fill.task is not asyncio.current_task():
            fill.task.cancel()
        convs = self._positions.get(channel)
        if convs is not None:
            convs.pop(conv, None)
        user = self._user_channels.get(channel)
        self._resync((user,) if user is not None else list(self._rooms.get(channel, ())))

    # --- fills ------------------------------------------------------------------------

    def _off_position(
        self, channel: str, convs: dict[str, int], pub: Publication, seq: int, last: int
    ) -> bool:
        """A publication that does not follow its conversation's position: hold it
        during a fill, drop it if a fill delivered it, or start a fill."""
        conv = pub.conv
        assert conv is not None
        floor = self._floors.get((channel, conv))
        if floor is not None and seq < floor:
            self._below_floor(channel, conv, seq)
            return True
        fill = self._fills.get((channel, conv))
        if fill is not None:
            if len(fill.held) >= HOLD_LIMIT:
                self._fail(fill, "too many publications held")
            else:
                fill.held.append(pub)
            return True
        if seq <= last:
            return True  # read by a fill before the bus brought it
        self.gaps += 1
        logger.info("live bus gap on %s: %s seq %d after %d; filling", channel, conv, seq, last)
        user = self._user_channels.get(channel)
        readers = [user] if user is not None else list(self._rooms.get(channel, ()))
        fill = _Fill(channel, conv, last, readers, settle=False)
        fill.held.append(pub)
        convs[conv] = FILLING
        self._start(fill)
        return True

    def _start(self, fill: _Fill) -> None:
        self._fills[(fill.channel, fill.conv)] = fill
        fill.task = asyncio.get_running_loop().create_task(self._run(fill))

    def _current(self, fill: _Fill) -> bool:
        """Whether ``fill`` is still the fill of its conversation (not dropped)."""
        return self._fills.get((fill.channel, fill.conv)) is fill

    async def _run(self, fill: _Fill) -> None:
        """Read what ``fill``'s conversation missed, route it and what was held."""
        try:
            if fill.settle:
                await self._bus.settle()
            read = 0
            rounds = 0
            filled_before = self.filled
            while self._current(fill):
                before = fill.last
                messages = await self._read_after(fill)
                read += len(messages)
                if read > FILL_LIMIT:
                    raise _FillFailed("too many messages missing")
                if (rounds or not fill.settle) and not [m for m in messages if m.seq > before]:
                    raise _FillFailed("the record has no message after the position")
                rounds += 1
                for message in messages:
                    if message.seq > fill.last and self._current(fill):
                        fill.last = message.seq
                        self.filled += 1
                        self._route(fill.channel, filled_publication(message))
                if not self._current(fill):
                    return
                if self._drain(fill):
                    if self.filled > filled_before or not fill.settle:  # something was missed
                        self.fills += 1
                        if self._on_fill is not None:
                            self._on_fill()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._current(fill):
                self._fail(fill, repr(exc))

    async def _read_after(self, fill: _Fill) -> list[Message]:
        """Every stored message of the conversation after ``fill.last``, read as the
        first of its readers who may (a reader kicked or gone meanwhile may not)."""
        error: Exception | None = None
        readers = dict.fromkeys(fill.readers)
        readers.update(dict.fromkeys(self._rooms.get(fill.channel, ())))
        for reader in readers:
            messages: list[Message] = []
            after = fill.last
            try:
                while True:
                    page, more = await self._read(reader, fill.conv, after)
                    messages += page
                    if not more or not page or len(messages) > FILL_LIMIT:
                        return messages
                    after = page[-1].seq
            except Exception as exc:
                error = exc
        raise _FillFailed(f"no reader: {error!r}")

    def _drain(self, fill: _Fill) -> bool:
        """Route the held publications that follow on; True when none is left (the
        fill is done and the conversation flows again), False when a gap remains."""
        held = fill.held
        i = 0
        while i < len(held) and self._current(fill):
            seq = held[i].seq
            assert seq is not None
            if seq > fill.last + 1:
                fill.held = held[i:]
                return False
            if seq == fill.last + 1:
                fill.last = seq
                self._route(fill.channel, held[i])
            i += 1
        if self._current(fill):
            del self._fills[(fill.channel, fill.conv)]
            convs = self._positions.get(fill.channel)
            if convs is not None:
                convs[fill.conv] = fill.last
        return True

    def _route(self, channel: str, pub: Publication) -> None:
        """Route a publication whose position was checked (a filled or held one)."""
        members = self._rooms.get(channel)
        if members is not None:
            for joiner in pub.joined:
                self._join(joiner, channel)
            self._deliver(members, pub)
            for leaver in pub.left:
                self._leave(leaver, channel)
            return
        user = self._user_channels.get(channel)
        if user is not None:
            self._deliver((user,), pub)

    def _fail(self, fill: _Fill, why: str) -> None:
        """Give up ``fill``: its channel's local users resync."""
        self.failed_fills += 1
        channel = fill.channel
        logger.warning("live bus gap on %s (%s) not filled: %s", channel, fill.conv, why)
        del self._fills[(channel, fill.conv)]
        if fill.task is not None and fill.task is not asyncio.current_task():
            fill.task.cancel()
        convs = self._positions.get(channel)
        if convs is not None:
            convs.pop(fill.conv, None)  # the next publication starts afresh
        self._floors.pop((channel, fill.conv), None)
        user = self._user_channels.get(channel)
        self._resync((user,) if user is not None else list(self._rooms.get(channel, ())))

    def _drop_fills(self, channel: str) -> None:
        """Forget the fills of ``channel`` (unsubscribed, or resynced)."""
        if not self._fills:
            return
        for key in [key for key in self._fills if key[0] == channel]:
            fill = self._fills.pop(key)
            if fill.task is not None and fill.task is not asyncio.current_task():
                fill.task.cancel()

    async def idle(self) -> None:
        """Answer once no fill is in flight (for tests and shutdown)."""
        while self._fills:
            tasks = [f.task for f in self._fills.values() if f.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)


class _FillFailed(Exception):
    """A fill cannot deliver what its conversation missed."""


MEMBERSHIP_EVENTS = {"joined": True, "left": False, "kicked": False}
"""Room system messages' ``meta.event`` that change membership: True adds
``meta.user``, False removes them."""


def filled_publication(message: Message) -> Publication:
    """The publication of a stored message read by a fill, with the membership
    change a room's system message makes (the writer's ``joined``/``left``)."""
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    meta = message.meta
    if message.type == "system" and meta is not None and message.conv.startswith("r:"):
        adds = MEMBERSHIP_EVENTS.get(meta.get("event"))  # type: ignore[arg-type]
        user = meta.get("user")
        if adds is not None and isinstance(user, str):
            if adds:
                joined = (user,)
            else:
                left = (user,)
    return Publication(
        event=Msg.of(message), conv=message.conv, seq=message.seq, joined=joined, left=left
    )
