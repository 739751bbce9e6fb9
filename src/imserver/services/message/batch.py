"""One write applied to a batch: its rules, its seq and its rows.

The writer keeps a :class:`BatchState` per batch (a working copy of the last seqs,
targets and markers the batch touches) and applies its writes to it one by one, in
batch order: :func:`apply` checks a message write against the state, allocates its
seq and adds its rows to the batch's :class:`~imserver.services.message.writes.WriteBatch`;
:func:`apply_mark` moves a watermark. Nothing here touches the database or the
writer's caches: a batch whose commit fails is simply dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from imserver.protocol.events import Receipt
from imserver.protocol.models import Message
from imserver.services.message.api import Members
from imserver.services.message.queued import (
    AnyMessageWrite,
    MarkWrite,
    ReactWrite,
    RecallWrite,
    SendWrite,
    SystemWrite,
)
from imserver.services.message.schema import IdemKey, MarkerKey, MessageKey, message_row
from imserver.services.message.writes import Target, WriteBatch
from imserver.utils.errors import BadRequest, Forbidden, NotFound
from imserver.utils.ids import ConvId

CONTENT_TYPES: Final = frozenset({"text", "image", "file", "custom"})
"""Types a client sends; the only valid targets of edit, recall and react."""
FILE_TYPES: Final = frozenset({"image", "file"})
"""Types whose ``meta.file`` names an uploaded file of the same conversation."""


@dataclass(slots=True)
class BatchState:
    """The writer's working state during one batch (discarded if the commit fails)."""

    last: dict[ConvId, int]
    targets: dict[MessageKey, Target]
    markers: dict[MarkerKey, tuple[int, int, bool]]
    known: dict[IdemKey, tuple[int, int]]
    ts: int
    write: WriteBatch = field(default_factory=WriteBatch)
    new_keys: dict[IdemKey, tuple[int, int]] = field(default_factory=dict)


def apply(
    state: BatchState,
    item: AnyMessageWrite,
    members: Members,
    roles: dict[tuple[str, str], str | None],
) -> Message:
    """Check one message write against the batch's state and add it to the batch.

    ``roles``: (room, user) -> role, for recalls by someone other than the sender.
    """
    conv = item.conv
    last = state.last[conv.id]
    meta: dict[str, Any] | None
    reply_to: int | None = None
    mentions: list[str] | None = None
    target: int | None = None
    if isinstance(item, SendWrite):
        msg_type, body, meta = item.type, item.body, item.meta
        if item.reply_to is not None:
            if item.reply_to > last:
                raise BadRequest(f"no message {item.reply_to} in {conv.id}", field="reply_to")
            reply_to = item.reply_to
        if item.mentions is not None:
            for user in item.mentions:
                if user not in members.set:
                    raise BadRequest(f"{user} is not a member of {conv.id}", field="mentions")
            mentions = item.mentions
    elif isinstance(item, SystemWrite):
        msg_type, body, meta = "system", item.body, item.meta
    else:
        target = item.target
        tkey = (conv.id, target)
        t = state.targets.get(tkey)
        if t is None:
            raise NotFound(f"no message {target} in {conv.id}", field="target")
        if t.type not in CONTENT_TYPES:
            raise BadRequest(f"a {t.type} message cannot be a target", field="target")
        if t.sender != item.user:
            if isinstance(item, RecallWrite):
                role = roles.get((conv.a, item.user)) if conv.kind == "room" else None
                if role not in ("owner", "admin"):
                    raise Forbidden("only the sender or a room admin may recall a message")
            elif not isinstance(item, ReactWrite):
                raise Forbidden("only the sender may edit a message")
        if t.recalled:
            raise BadRequest(f"message {target} was recalled", field="target")
        if isinstance(item, RecallWrite):
            msg_type, body, meta = "recall", "", {"target": target}
            state.write.recalls.append(tkey)
            state.write.edits.pop(tkey, None)
            state.targets[tkey] = t._replace(recalled=True)
        elif isinstance(item, ReactWrite):
            msg_type, body = "reaction", ""
            meta = {"target": target, "emoji": item.emoji, "remove": item.remove}
        else:
            msg_type, body, meta = "edit", item.body, {"target": target}
            state.write.edits[tkey] = body
    seq = last + 1
    state.last[conv.id] = seq
    msg = Message(
        conv=conv.id,
        seq=seq,
        from_=item.user,
        ts=state.ts,
        type=msg_type,
        body=body,
        cid=item.cid,
        meta=meta,
        reply_to=reply_to,
        mentions=mentions,
    )
    write = state.write
    write.messages.append(message_row(msg, target))
    if isinstance(item, ReactWrite):
        assert target is not None
        rkey = (conv.id, target, item.emoji, item.user)
        write.reactions[rkey] = None if item.remove else seq
    if msg_type in CONTENT_TYPES:
        state.targets[(conv.id, seq)] = Target(item.user, msg_type, False)
    if msg_type in FILE_TYPES:
        assert meta is not None
        write.files.append({"file_id": meta["file"], "conv": conv.id, "seq": seq})
    if mentions:
        write.mentions.extend({"conv": conv.id, "user_id": user, "seq": seq} for user in mentions)
    if seq == 1 and conv.kind == "direct":
        write.peers.append({"user_id": conv.a, "peer_id": conv.b, "conv": conv.id})
        write.peers.append({"user_id": conv.b, "peer_id": conv.a, "conv": conv.id})
    return msg


def apply_mark(state: BatchState, item: MarkWrite) -> Receipt | None:
    """Move a watermark forward within the batch; the receipt to publish, if it moved."""
    conv_id = item.conv.id
    seq = min(item.seq, state.last[conv_id])
    key = (conv_id, item.user)
    read, recv, exists = state.markers.get(key, (0, 0, False))
    if item.receipt == "read":
        if seq <= read:
            return None
        read = seq
        recv = max(recv, seq)
    else:
        if seq <= recv:
            return None
        recv = seq
    state.markers[key] = (read, recv, exists)
    state.write.markers[key] = (read, recv, exists)
    return Receipt(conv=conv_id, user=item.user, seq=seq, kind=item.receipt)
