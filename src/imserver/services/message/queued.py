"""The writes queued for the group-commit writer: one typed item per write kind.

Each kind carries only its own fields and is answered with its own result:

- :class:`SendWrite`, :class:`EditWrite`, :class:`RecallWrite`, :class:`ReactWrite`
  and :class:`SystemWrite` store one message each and resolve to
  :class:`~imserver.protocol.ops.SendData` (``dup: true`` for a repeated key);
- :class:`MarkWrite` moves a watermark and resolves to ``None``
  (:class:`MarkDone` says, inside the writer, whether the watermark moved).

The writer decides an item's :attr:`answer` during its batch (a refusal as an
:class:`~imserver.utils.errors.IMError`, a stored message as its ``SendData``) and
hands it to the waiting caller with :meth:`settle` after the commit, or
:meth:`fail` when the commit fails.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from imserver.protocol import ops
from imserver.protocol.convs import ConvRef
from imserver.protocol.models import ReceiptKind
from imserver.services.message.api import Members
from imserver.utils.errors import IMError


@dataclass(slots=True, eq=False, kw_only=True)
class MessageWrite:
    """A write that stores one message; ``future`` resolves after its batch's commit.

    ``(conv, user, cid)`` is its idempotency key.
    """

    conv: ConvRef
    user: str
    future: asyncio.Future[ops.SendData]
    cid: str
    session: str | None = None
    """The connection it came from; the sender's other connections get the event."""
    answer: ops.SendData | IMError | None = field(default=None, init=False)
    """What the writer decided; ``None`` until then."""

    def settle(self) -> None:
        """Hand the decided answer to the caller (unless it gave up waiting)."""
        if self.future.done():
            return
        answer = self.answer
        if isinstance(answer, IMError):
            self.future.set_exception(answer)
        elif answer is not None:
            self.future.set_result(answer)

    def fail(self, exc: IMError) -> None:
        """Answer after a failed commit: a refusal or a duplicate keeps its answer
        (neither needed the commit), a message that was to be stored gets ``exc``."""
        answer = self.answer
        if isinstance(answer, IMError) or (answer is not None and answer.dup):
            self.settle()
        elif not self.future.done():
            self.future.set_exception(type(exc)(exc.message))


@dataclass(slots=True, eq=False, kw_only=True)
class SendWrite(MessageWrite):
    """``send``: a client's message."""

    type: str
    body: str
    meta: dict[str, Any] | None = None
    """For ``image``/``file``, the writer adds the file's name, size, mime and thumb URL."""
    reply_to: int | None = None
    mentions: list[str] | None = None


@dataclass(slots=True, eq=False, kw_only=True)
class EditWrite(MessageWrite):
    """``edit``: new text for the caller's own message ``target``."""

    target: int
    body: str


@dataclass(slots=True, eq=False, kw_only=True)
class RecallWrite(MessageWrite):
    """``recall``: withdraw ``target`` (its sender, or a room owner/admin)."""

    target: int


@dataclass(slots=True, eq=False, kw_only=True)
class ReactWrite(MessageWrite):
    """``react``: add or remove one emoji of the caller on ``target``."""

    target: int
    emoji: str
    remove: bool


@dataclass(slots=True, eq=False, kw_only=True)
class SystemWrite(MessageWrite):
    """A ``system`` message: a notice in ``s:<user>`` or a room event in ``r:<room>``.

    ``notify``: users beyond the members who get the event (a user just kicked).
    ``members``: the room's members from this message on (a membership change).
    """

    body: str
    meta: dict[str, Any] | None = None
    notify: tuple[str, ...] = ()
    members: Members | None = None


class MarkDone(enum.Enum):
    """A mark's result inside the writer: whether the watermark moved."""

    MOVED = "moved"
    UNCHANGED = "unchanged"


@dataclass(slots=True, eq=False, kw_only=True)
class MarkWrite:
    """``read``/``recv``: move ``user``'s watermark in ``conv`` forward to ``seq``."""

    conv: ConvRef
    user: str
    future: asyncio.Future[None]
    seq: int
    receipt: ReceiptKind
    session: str | None = None
    login: str = ""
    answer: MarkDone | IMError | None = field(default=None, init=False)

    def settle(self) -> None:
        """Hand the decided answer to the caller (unless it gave up waiting)."""
        if self.future.done():
            return
        if isinstance(self.answer, IMError):
            self.future.set_exception(self.answer)
        elif self.answer is not None:
            self.future.set_result(None)

    def fail(self, exc: IMError) -> None:
        """Answer after a failed commit: a refusal keeps its answer, else ``exc``."""
        if isinstance(self.answer, IMError):
            self.settle()
        elif not self.future.done():
            self.future.set_exception(type(exc)(exc.message))


AnyMessageWrite = SendWrite | EditWrite | RecallWrite | ReactWrite | SystemWrite
"""Any write that stores a message."""

Write = AnyMessageWrite | MarkWrite
"""Any queued write."""
