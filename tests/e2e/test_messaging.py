"""End-to-end tests of docs/protocol.md §4 as a client author reads it: conversation ids,
send/ack/msg, idempotent resend, validation, history paging, markers and receipts,
typing, edit/recall/react, search and blocking.

Every refusal is checked for its exact ``code`` (and ``field`` where the contract or
docs/notes/message.md names one), for the connection staying usable, and for nothing
having been stored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from refusals import refused

from imserver.client import Client

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Clients, ServerProcess, Wire

Frame = dict[str, Any]
MSG_FIELDS = {"op", "conv", "seq", "from", "ts", "type", "body", "cid"}
OPTIONAL_MSG_FIELDS = ("meta", "reply_to", "mentions")


# --- helpers --------------------------------------------------------------------------


def new_cid() -> str:
    return uuid.uuid4().hex


def dm(a: Client, b: Client) -> str:
    return Client.direct_conv(a.user_id, b.user_id)


def now_ms() -> int:
    return int(time.time() * 1000)


async def all_messages(c: Client, conv: str) -> list[Frame]:
    """Every message of ``conv`` (at most 200 in these tests), ascending."""
    page = await c.history(conv, after=0, limit=200)
    assert page["has_more"] is False
    messages: list[Frame] = page["messages"]
    return messages


async def conv_entry(c: Client, conv: str) -> Frame | None:
    found = [e for e in await c.convs() if e["conv"] == conv]
    assert len(found) <= 1, found
    return found[0] if found else None


def send(c: Client, conv: str, body: str = "x", **extra: Any) -> Awaitable[Frame]:
    return c.send_message(conv, body, **extra)


async def next_msg(c: Client, conv: str) -> Frame:
    return await c.next_event("msg", match=lambda e: e.get("conv") == conv)


# --- conversation ids -----------------------------------------------------------------

ConvOp = Callable[[Client, str], Awaitable[Any]]

CONV_OPS: dict[str, ConvOp] = {
    "send": lambda c, conv: c.request(
        "send", conv=conv, cid=new_cid(), type="text", body="should not be stored"
    ),
    "edit": lambda c, conv: c.request("edit", conv=conv, cid=new_cid(), target=1, body="e"),
    "recall": lambda c, conv: c.request("recall", conv=conv, cid=new_cid(), target=1),
    "react": lambda c, conv: c.request("react", conv=conv, cid=new_cid(), target=1, emoji="+"),
    "history": lambda c, conv: c.request("history", conv=conv),
    "read": lambda c, conv: c.request("read", conv=conv, seq=1),
    "recv": lambda c, conv: c.request("recv", conv=conv, seq=1),
    "typing": lambda c, conv: c.request("typing", conv=conv),
    "search": lambda c, conv: c.request("search", query="anything", conv=conv),
}


@pytest.mark.parametrize(
    ("case", "code", "field"),
    [
        ("reversed", "bad_request", "conv"),
        ("same_user_twice", "bad_request", "conv"),
        ("unknown_peer", "not_found", "conv"),
        ("two_unknown_users", "not_found", "conv"),
        ("not_the_caller", "forbidden", None),
        ("unknown_prefix", "bad_request", "conv"),
        ("direct_one_part", "bad_request", "conv"),
        ("direct_three_parts", "bad_request", "conv"),
        ("system_extra_part", "bad_request", "conv"),
        ("room_extra_part", "bad_request", "conv"),
    ],
)
async def test_conversation_id_errors(
    shared_server: ServerProcess, clients: Clients, case: str, code: str, field: str | None
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    lo, hi = sorted((a.user_id, b.user_id))
    me = a.user_id
    conv = {
        "reversed": f"d:{hi}:{lo}",
        "same_user_twice": f"d:{me}:{me}",
        "unknown_peer": f"d:{me}:{me}0",  # "<me>0" sorts after "<me>" and does not exist
        "two_unknown_users": f"d:{me}0:{me}1",
        "not_the_caller": Client.direct_conv(b.user_id, c.user_id),
        "unknown_prefix": f"x:{me}",
        "direct_one_part": f"d:{me}",
        "direct_three_parts": f"d:{lo}:{hi}:x",
        "system_extra_part": f"s:{me}:x",
        "room_extra_part": f"r:{me}:x",
    }[case]
    for name, op in CONV_OPS.items():
        await refused(op(a, conv), code, field, what=f"{name} on {conv}")
    # The connection still works and nothing was stored anywhere.
    assert await a.ping() == {}
    for user in (a, b, c):
        assert await user.convs() == []
    assert await all_messages(b, Client.direct_conv(b.user_id, c.user_id)) == []


async def test_system_conversation_is_readable_but_read_only(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    mine = f"s:{a.user_id}"
    assert await a.history(mine) == {"messages": [], "has_more": False}
    assert await a.request("read", conv=mine, seq=1) == {}
    assert await a.request("recv", conv=mine, seq=1) == {}
    for name in ("send", "edit", "recall", "react", "typing"):
        await refused(CONV_OPS[name](a, mine), "forbidden", what=name)
    # Somebody else's notices: not readable either.
    theirs = f"s:{b.user_id}"
    for name in ("history", "read", "recv", "send", "typing", "search"):
        await refused(CONV_OPS[name](a, theirs), "forbidden", what=name)
    assert await a.ping() == {}
    assert await a.convs() == []  # s: appears only once it holds a message
    assert await b.history(theirs) == {"messages": [], "has_more": False}


async def test_never_used_direct_conversation_is_an_empty_page(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    assert await a.history(dm(a, b)) == {"messages": [], "has_more": False}
    assert await a.convs() == []


# --- send, ack, msg, history, dup (over every wire) -----------------------------------


async def test_send_ack_msg_and_history(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    a = await clients.user(shared_server, "a")  # the test's wire
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)

    t0 = now_ms()
    body = 'héllo 👋 \u0000 \\ " end'
    ack = await a.send_message(conv, body, cid="c-1")
    t1 = now_ms()
    assert set(ack) >= {"conv", "seq", "ts", "cid", "dup"}
    assert (ack["conv"], ack["seq"], ack["cid"], ack["dup"]) == (conv, 1, "c-1", False)
    assert type(ack["ts"]) is int and t0 - 2000 <= ack["ts"] <= t1 + 2000

    ev = await next_msg(b, conv)
    assert set(ev) >= MSG_FIELDS
    for key in OPTIONAL_MSG_FIELDS:
        assert key not in ev, f"{key} must be absent when not set: {ev}"
    assert (ev["conv"], ev["seq"], ev["from"], ev["ts"], ev["type"], ev["body"], ev["cid"]) == (
        conv,
        1,
        a.user_id,
        ack["ts"],
        "text",
        body,
        "c-1",
    )

    meta = {"k": [1, "two", {"three": None}], "flag": True, "f": 1.5}
    ack2 = await a.send_message(
        conv,
        "second",
        cid="c-2",
        type="custom",
        meta=meta,
        reply_to=1,
        mentions=[b.user_id, b.user_id],
    )
    assert (ack2["seq"], ack2["dup"]) == (2, False)
    ev2 = await next_msg(b, conv)
    assert (ev2["seq"], ev2["type"], ev2["meta"], ev2["reply_to"], ev2["mentions"]) == (
        2,
        "custom",
        meta,
        1,
        [b.user_id],  # repeated ids are stored once
    )

    # The sending session never got its own messages: B's reply is its next msg.
    await b.send_message(conv, "back", cid="c-b")
    mine = await next_msg(a, conv)
    assert (mine["seq"], mine["from"], mine["body"]) == (3, b.user_id, "back")

    # history shows exactly what was pushed (no annotations on untouched messages).
    history = await all_messages(a, conv)
    assert [m["seq"] for m in history] == [1, 2, 3]
    assert history[0] == {k: v for k, v in ev.items() if k != "op"}
    assert history[1] == {k: v for k, v in ev2.items() if k != "op"}
    assert history[2]["cid"] == "c-b" and history[2]["from"] == b.user_id


async def test_idempotent_resend(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    first = await a.send_message(conv, "once", cid="same-cid")
    assert (first["seq"], first["dup"]) == (1, False)
    assert (await next_msg(b, conv))["cid"] == "same-cid"

    for body in ("once", "a different body is ignored"):
        again = await a.send_message(conv, body, cid="same-cid")
        assert again == {**first, "dup": True}

    # The duplicate published nothing: B's next msg is the next real message.
    nxt = await a.send_message(conv, "next", cid="other-cid")
    assert (nxt["seq"], nxt["dup"]) == (2, False)
    ev = await next_msg(b, conv)
    assert (ev["seq"], ev["cid"]) == (2, "other-cid")

    history = await all_messages(b, conv)
    assert [(m["seq"], m["cid"], m["body"]) for m in history] == [
        (1, "same-cid", "once"),
        (2, "other-cid", "next"),
    ]
    # The key is (conv, sender, cid): B may use the same cid, and it is a new message;
    # so is A's same cid in another conversation.
    theirs = await b.send_message(conv, "mine", cid="same-cid")
    assert (theirs["seq"], theirs["dup"]) == (3, False)
    c = await clients.user(shared_server, "c", transport="ws", codec="json")
    elsewhere = await a.send_message(dm(a, c), "elsewhere", cid="same-cid")
    assert (elsewhere["conv"], elsewhere["seq"], elsewhere["dup"]) == (dm(a, c), 1, False)
    assert (await next_msg(c, dm(a, c)))["body"] == "elsewhere"


async def test_fire_and_forget_send(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a", transport="tcp", codec="json")
    b = await clients.user(shared_server, "b", transport="ws", codec="msgpack")
    conv = dm(a, b)
    # Without rid: stored and delivered, but no reply.
    await a.send_frame({"op": "send", "conv": conv, "cid": "ff-1", "type": "text", "body": "ff"})
    ev = await next_msg(b, conv)
    assert (ev["seq"], ev["cid"], ev["body"]) == (1, "ff-1", "ff")
    # A failure is answered even without rid (an error reply without rid).
    await a.send_frame(
        {"op": "send", "conv": conv, "cid": "ff-2", "type": "text", "body": "x", "reply_to": 9}
    )
    err = await a.next_event("reply")
    assert err["ok"] is False and "rid" not in err
    assert (err["error"]["code"], err["error"]["field"]) == ("bad_request", "reply_to")
    assert await a.ping() == {}
    assert a.events_nowait("reply") == []  # the successful send was never answered
    assert [m["cid"] for m in await all_messages(a, conv)] == ["ff-1"]


# --- membership and validation --------------------------------------------------------


async def test_non_members_are_refused(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    conv = dm(a, b)
    await a.send_message(conv, "private")
    for name, op in CONV_OPS.items():
        await refused(op(c, conv), "forbidden", what=name)
    assert await c.ping() == {}
    assert await c.convs() == []
    history = await all_messages(a, conv)
    assert [m["body"] for m in history] == ["private"]
    entry = await conv_entry(b, conv)
    assert entry is not None and entry["last_seq"] == 1
    assert await c.events_before_ping("msg") == []


async def test_send_validation(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    conv = dm(a, b)
    await a.send_message(conv, "first")  # seq 1

    for kind in ("image", "file"):
        await refused(send(a, conv, type=kind), "bad_request", "meta")
        await refused(send(a, conv, type=kind, meta={"name": "x.png"}), "bad_request", "meta")
        await refused(send(a, conv, type=kind, meta={"file": ""}), "bad_request", "meta")
        await refused(send(a, conv, type=kind, meta={"file": 7}), "bad_request", "meta")
    await refused(send(a, conv, type="video"), "bad_request", "type")
    await refused(send(a, conv, reply_to=2), "bad_request", "reply_to")  # no seq 2 yet
    await refused(send(a, conv, reply_to=0), "bad_request", "reply_to")
    await refused(send(a, conv, mentions=[c.user_id]), "bad_request", "mentions")
    await refused(send(a, conv, mentions=[f"{a.user_id}0"]), "bad_request", "mentions")
    await refused(send(a, conv, mentions=[5]), "bad_request", "mentions")
    await refused(send(a, conv, cid=""), "bad_request", "cid")
    await refused(send(a, conv, cid="c" * 65), "bad_request", "cid")
    await refused(a.request("send", conv=conv, cid=5, type="text", body="x"), "bad_request", "cid")
    await refused(a.request("send", conv=conv, cid=new_cid(), type="text"), "bad_request", "body")
    max_body = a.hello_data["limits"]["max_body"] if a.hello_data else 16384
    await refused(send(a, conv, "a" * (max_body + 1)), "too_large", "body")

    # Nothing of the refused sends was stored, no seq was used, the connection is fine.
    assert await a.ping() == {}
    assert [m["seq"] for m in await all_messages(a, conv)] == [1]

    # A refused cid was not consumed: the same cid now stores a new message.
    cid = "reused-after-refusal"
    await refused(send(a, conv, cid=cid, reply_to=99), "bad_request", "reply_to")
    ok = await a.send_message(conv, "ok", cid=cid, reply_to=1, mentions=[a.user_id, b.user_id])
    assert (ok["seq"], ok["dup"]) == (2, False)
    # max_body counts characters, not bytes: 2-byte characters up to the limit are fine.
    long = await a.send_message(conv, "é" * max_body)
    assert long["seq"] == 3
    # Empty bodies are allowed; custom needs no meta.
    assert (await a.send_message(conv, "", type="custom"))["seq"] == 4
    history = await all_messages(b, conv)
    assert [m["seq"] for m in history] == [1, 2, 3, 4]
    assert history[1]["reply_to"] == 1 and history[1]["mentions"] == [a.user_id, b.user_id]
    assert history[2]["body"] == "é" * max_body
    assert history[3]["body"] == "" and history[3]["type"] == "custom"


async def test_meta_values_both_codecs_can_carry(
    shared_server: ServerProcess, clients: Clients
) -> None:
    """A value one codec cannot encode is refused whatever codec it arrives in, naming
    ``meta``: stored, it would break every read of the other codec's recipients. The
    values at the edges of the model reach both codecs, live and from history."""
    a = await clients.user(shared_server, "a", transport="ws", codec="json")
    b = await clients.user(shared_server, "b", transport="tcp", codec="msgpack")
    b_json = await clients.connect(shared_server, "ws", "json", login_as=None)
    await b_json.auth(b.token)
    conv = dm(a, b)
    deep: Any = 0
    for _ in range(32):  # {"deep": deep} is 33 levels deep, {"deep": deep[0]} 32
        deep = [deep]
    for meta in (
        {"n": 2**64},
        {"n": 2**63},
        {"n": -(2**63) - 1},
        {"list": [1, {"deeper": 10**30}]},
        {"deep": deep},
    ):
        await refused(send(a, conv, meta=meta), "bad_request", "meta", what=str(meta)[:40])
    max_meta = a.hello_data["limits"]["max_meta"] if a.hello_data else 8192
    await refused(send(a, conv, meta={"s": "x" * max_meta}), "too_large", "meta")
    # MessagePack can say what JSON cannot: NaN, infinity, unsigned 64-bit integers.
    for meta in ({"f": float("nan")}, {"f": float("-inf")}, {"n": 2**64 - 1}):
        await refused(send(b, conv, meta=meta), "bad_request", "meta", what=str(meta))
    assert await a.ping() == {} and await b.ping() == {}

    edge = {"max": 2**63 - 1, "min": -(2**63), "f": -1.5e308, "deep": deep[0], "u": "é\u0000"}
    ack = await send(a, conv, meta=edge)
    assert ack["seq"] == 1  # nothing refused used a seq
    for reader in (b, b_json):
        assert (await next_msg(reader, conv))["meta"] == edge
        assert [m["meta"] for m in await all_messages(reader, conv)] == [edge]
        entry = await conv_entry(reader, conv)
        assert entry is not None and entry["last"]["meta"] == edge


# --- history paging -------------------------------------------------------------------


async def test_history_paging(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    for i in range(1, 8):
        assert (await a.send_message(conv, f"m{i}"))["seq"] == i

    async def page(**kw: Any) -> tuple[list[int], bool]:
        data = await b.history(conv, **kw)
        return [m["seq"] for m in data["messages"]], data["has_more"]

    assert await page(limit=3) == ([5, 6, 7], True)  # latest
    assert await page(before=5, limit=3) == ([2, 3, 4], True)
    assert await page(before=2, limit=3) == ([1], False)
    assert await page(before=4, limit=3) == ([1, 2, 3], False)
    assert await page(after=0, limit=3) == ([1, 2, 3], True)
    assert await page(after=3, limit=4) == ([4, 5, 6, 7], False)
    assert await page(after=3, limit=3) == ([4, 5, 6], True)
    assert await page(after=7) == ([], False)
    assert await page(after=100) == ([], False)
    assert await page(before=1) == ([], False)
    assert await page(limit=7) == ([1, 2, 3, 4, 5, 6, 7], False)
    assert await page(limit=6) == ([2, 3, 4, 5, 6, 7], True)
    assert await page() == ([1, 2, 3, 4, 5, 6, 7], False)  # default limit 50
    assert await page(limit=200) == ([1, 2, 3, 4, 5, 6, 7], False)

    await refused(b.history(conv, limit=0), "bad_request", "limit")
    await refused(b.history(conv, limit=201), "bad_request", "limit")
    await refused(b.history(conv, after=-1), "bad_request", "after")
    await refused(b.history(conv, before=0), "bad_request", "before")
    await refused(b.history(conv, after=1, before=5), "bad_request", "before")
    assert await b.ping() == {}


# --- read / recv markers and receipts -------------------------------------------------


async def test_markers_and_receipts(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b1 = await clients.user(shared_server, "b")
    assert b1.user is not None
    b2 = await clients.connect(shared_server, "tcp", "msgpack")
    await b2.auth(b1.token)
    conv = dm(a, b1)
    for i in range(3):
        await a.send_message(conv, f"m{i}")
    for c in (b1, b2):
        assert [(await next_msg(c, conv))["seq"] for _ in range(3)] == [1, 2, 3]

    entry = await conv_entry(b1, conv)
    assert entry is not None
    assert (entry["last_seq"], entry["read_seq"], entry["recv_seq"], entry["unread"]) == (
        3,
        0,
        0,
        3,
    )
    assert entry["kind"] == "direct" and entry["mentions"] == 0

    def receipt_of(c: Client) -> Awaitable[Frame]:
        return c.next_event("receipt", match=lambda e: e.get("conv") == conv)

    # recv from b2: A and b1 are told, b2 (the sender of the op) is not.
    assert await b2.request("recv", conv=conv, seq=1) == {}
    expected = {"op": "receipt", "conv": conv, "user": b1.user_id, "seq": 1, "kind": "recv"}
    assert await receipt_of(a) == expected
    assert await receipt_of(b1) == expected

    # read from b1 also raises recv; A and b2 are told, b1 is not.
    assert await b1.request("read", conv=conv, seq=2) == {}
    expected = {**expected, "seq": 2, "kind": "read"}
    assert await receipt_of(a) == expected
    assert await receipt_of(b2) == expected
    entry = await conv_entry(b1, conv)
    assert entry is not None
    assert (entry["read_seq"], entry["recv_seq"], entry["unread"]) == (2, 2, 1)

    # Watermarks only move forward: lower or equal values are no-ops, publish nothing.
    for kind, seq in (("read", 1), ("read", 2), ("recv", 1), ("recv", 2)):
        assert await b1.request(kind, conv=conv, seq=seq) == {}
    entry = await conv_entry(b1, conv)
    assert entry is not None
    assert (entry["read_seq"], entry["recv_seq"], entry["unread"]) == (2, 2, 1)

    # A value past last_seq is clamped to it; the receipt says the clamped seq.
    assert await b1.request("read", conv=conv, seq=99) == {}
    expected = {**expected, "seq": 3}
    assert await receipt_of(a) == expected  # the next receipt: the no-ops published none
    assert await receipt_of(b2) == expected
    entry = await conv_entry(b1, conv)
    assert entry is not None
    assert (entry["last_seq"], entry["read_seq"], entry["recv_seq"], entry["unread"]) == (
        3,
        3,
        3,
        0,
    )
    # The reading session itself never got a receipt of its own ops.
    assert b1.events_nowait("receipt") == []
    assert b2.events_nowait("receipt") == []

    # A's own messages are never unread for A; B's reply is.
    entry = await conv_entry(a, conv)
    assert entry is not None
    assert (entry["read_seq"], entry["recv_seq"], entry["unread"]) == (0, 0, 0)
    await b1.send_message(conv, "reply")
    entry = await conv_entry(a, conv)
    assert entry is not None
    assert (entry["last_seq"], entry["unread"]) == (4, 1)
    assert entry["last"]["body"] == "reply" and entry["last"]["from"] == b1.user_id
    assert entry["title"] == b1.user["display_name"]

    await refused(b1.request("read", conv=conv, seq=-1), "bad_request", "seq")
    await refused(b1.request("read", conv=conv), "bad_request", "seq")
    assert await b1.ping() == {}


async def test_convs_order_unread_and_mentions(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    ab, ac = dm(a, b), dm(a, c)
    await b.send_message(ab, "plain")  # ab 1
    await b.send_message(ab, "hey you", mentions=[a.user_id])  # ab 2
    await c.send_message(ac, "from c")  # ac 1
    convs = await a.convs()
    assert [e["conv"] for e in convs] == [ac, ab]  # latest activity first
    by_conv = {e["conv"]: e for e in convs}
    assert (by_conv[ab]["unread"], by_conv[ab]["mentions"]) == (2, 1)
    assert (by_conv[ac]["unread"], by_conv[ac]["mentions"]) == (1, 0)
    assert by_conv[ac]["title"] == (c.user or {}).get("display_name")

    # A reaction is activity too (and the `last` message), but not unread.
    await b.request("react", conv=ab, cid=new_cid(), target=1, emoji="👀")  # ab 3
    convs = await a.convs()
    assert [e["conv"] for e in convs] == [ab, ac]
    assert convs[0]["last"]["type"] == "reaction" and convs[0]["last_seq"] == 3
    assert (convs[0]["unread"], convs[0]["mentions"]) == (2, 1)

    await b.send_message(ab, "again @a", mentions=[a.user_id])  # ab 4
    await a.request("read", conv=ab, seq=2)
    entry = await conv_entry(a, ab)
    assert entry is not None
    assert (entry["read_seq"], entry["unread"], entry["mentions"]) == (2, 1, 1)
    # A recalled message no longer counts, mention included.
    await b.request("recall", conv=ab, cid=new_cid(), target=4)  # ab 5
    entry = await conv_entry(a, ab)
    assert entry is not None
    assert (entry["last_seq"], entry["unread"], entry["mentions"]) == (5, 0, 0)
    # B's own messages are never unread for B.
    entry = await conv_entry(b, ab)
    assert entry is not None
    assert (entry["unread"], entry["mentions"]) == (0, 0)


# --- typing ---------------------------------------------------------------------------


async def test_typing_reaches_peers_only_and_stores_nothing(
    shared_server: ServerProcess, clients: Clients
) -> None:
    a1 = await clients.user(shared_server, "a")
    a2 = await clients.connect(shared_server, "tcp", "json")
    await a2.auth(a1.token)
    b1 = await clients.user(shared_server, "b")
    b2 = await clients.connect(shared_server, "ws", "msgpack")
    await b2.auth(b1.token)
    conv = dm(a1, b1)

    assert await a1.request("typing", conv=conv) == {}
    expected = {"op": "typing", "conv": conv, "user": a1.user_id}
    for c in (b1, b2):
        assert await c.next_event("typing") == expected

    # Nothing was stored: no seq, no conversation in convs, an empty history.
    assert await a1.convs() == []
    assert await b1.history(conv) == {"messages": [], "has_more": False}

    # The typist's sessions got nothing: the next event they see is B's message.
    await b1.send_message(conv, "after typing")
    for c in (a1, a2):
        ev = await c.next_event({"typing", "msg"})
        assert (ev["op"], ev["seq"]) == ("msg", 1)
    assert (await b2.next_event({"typing", "msg"}))["op"] == "msg"
    assert b1.events_nowait("typing") == []


# --- edit / recall / react ------------------------------------------------------------


async def test_edit_recall_react(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    orig = await a.send_message(conv, "original", cid="orig", meta={"k": 1})
    assert orig["seq"] == 1
    await next_msg(b, conv)

    # edit: its own message, stored with a seq.
    ack = await a.request("edit", conv=conv, cid="e1", target=1, body="edited")
    assert (ack["conv"], ack["seq"], ack["cid"], ack["dup"]) == (conv, 2, "e1", False)
    ev = await next_msg(b, conv)
    assert {k: ev[k] for k in ("seq", "from", "type", "body", "cid", "meta")} == {
        "seq": 2,
        "from": a.user_id,
        "type": "edit",
        "body": "edited",
        "cid": "e1",
        "meta": {"target": 1},
    }
    # Idempotent like send; one cid key space for every write op.
    assert await a.request("edit", conv=conv, cid="e1", target=1, body="x") == {**ack, "dup": True}
    again = await a.request("edit", conv=conv, cid="orig", target=1, body="x")
    assert again == {**orig, "dup": True}

    # Refusals store nothing.
    await refused(b.request("edit", conv=conv, cid=new_cid(), target=1, body="no"), "forbidden")
    await refused(b.request("recall", conv=conv, cid=new_cid(), target=1), "forbidden")
    for op, extra in (
        ("edit", {"body": "?"}),
        ("recall", {}),
        ("react", {"emoji": "👍"}),
    ):
        await refused(
            a.request(op, {"conv": conv, "cid": new_cid(), "target": 99, **extra}),
            "not_found",
            "target",
        )
        # an edit message is not a valid target
        await refused(
            a.request(op, {"conv": conv, "cid": new_cid(), "target": 2, **extra}),
            "bad_request",
            "target",
        )
    max_body = a.hello_data["limits"]["max_body"] if a.hello_data else 16384
    await refused(
        a.request("edit", conv=conv, cid=new_cid(), target=1, body="b" * (max_body + 1)),
        "too_large",
        "body",
    )
    await refused(
        a.request("react", conv=conv, cid=new_cid(), target=1, emoji=""), "bad_request", "emoji"
    )
    await refused(
        a.request("react", conv=conv, cid=new_cid(), target=1, emoji="x" * 17),
        "bad_request",
        "emoji",
    )
    assert await a.ping() == {} and await b.ping() == {}
    assert [m["seq"] for m in await all_messages(a, conv)] == [1, 2]

    # react: each one a message; history aggregates {emoji: [users in reaction order]}.
    seq = 2
    for who, emoji, remove in (
        (b, "👍", False),
        (a, "👍", False),
        (a, "❤️", False),
        (a, "❤️", False),  # again: stored, changes nothing
        (b, "🎉", True),  # removing what B never gave: stored, changes nothing
    ):
        seq += 1
        r = await who.request(
            "react", conv=conv, cid=new_cid(), target=1, emoji=emoji, remove=remove
        )
        assert (r["seq"], r["dup"]) == (seq, False)
    reaction = await next_msg(a, conv)  # B's first reaction
    assert (reaction["type"], reaction["body"], reaction["from"]) == ("reaction", "", b.user_id)
    assert reaction["meta"] == {"target": 1, "emoji": "👍", "remove": False}

    history = await all_messages(b, conv)
    first = history[0]
    assert (first["body"], first.get("edited"), first["meta"]) == ("edited", True, {"k": 1})
    assert first["reactions"] == {"👍": [b.user_id, a.user_id], "❤️": [a.user_id]}
    assert [m["type"] for m in history] == ["text", "edit"] + ["reaction"] * 5

    seq += 1
    r = await b.request("react", conv=conv, cid=new_cid(), target=1, emoji="👍", remove=True)
    assert r["seq"] == seq
    seq += 1
    await a.request("react", conv=conv, cid=new_cid(), target=1, emoji="❤️", remove=True)
    first = (await b.history(conv, after=0, limit=1))["messages"][0]
    assert first["reactions"] == {"👍": [a.user_id]}

    # recall by the sender: the original shows recalled, empty body, no meta/reactions.
    seq += 1
    rec = await a.request("recall", conv=conv, cid="r1", target=1)
    assert (rec["seq"], rec["dup"]) == (seq, False)
    ev = await b.next_event(
        "msg", match=lambda e: e.get("conv") == conv and e.get("type") == "recall"
    )
    assert (ev["seq"], ev["body"], ev["meta"], ev["from"]) == (seq, "", {"target": 1}, a.user_id)
    history = await all_messages(b, conv)
    first = history[0]
    assert first["recalled"] is True and first["body"] == ""
    assert "meta" not in first and "reactions" not in first
    assert history[1]["type"] == "edit" and history[1]["body"] == ""  # the edit's text is gone
    assert [m["seq"] for m in history] == list(range(1, seq + 1))

    # A recalled message can no longer be edited, recalled or reacted to.
    for op, extra in (("edit", {"body": "?"}), ("recall", {}), ("react", {"emoji": "👍"})):
        await refused(
            a.request(op, {"conv": conv, "cid": new_cid(), "target": 1, **extra}),
            "bad_request",
            "target",
        )
    entry = await conv_entry(b, conv)
    assert entry is not None
    assert (entry["last_seq"], entry["unread"]) == (seq, 0)  # a recalled message is not unread
    assert entry["last"]["type"] == "recall" and entry["last"]["meta"] == {"target": 1}


# --- search ---------------------------------------------------------------------------


async def test_search(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    c = await clients.user(shared_server, "c")
    word = "zq" + uuid.uuid4().hex[:10]  # unique on the shared server
    ab, ac, bc = dm(a, b), dm(a, c), dm(b, c)
    await a.send_message(ab, f"first {word} in ab")  # ab 1
    await c.send_message(ac, f"{word} from c")  # ac 1
    await b.send_message(bc, f"{word} not for a")  # bc 1 (A is not a member)
    await b.send_message(ab, f"second {word}")  # ab 2
    await a.send_message(ab, "no match here")  # ab 3
    await c.send_message(ac, f"LAST {word.upper()}")  # ac 2 (case-insensitive)

    found = await a.request("search", query=word)
    got = [(m["conv"], m["seq"]) for m in found["messages"]]
    assert got == [(ac, 2), (ab, 2), (ac, 1), (ab, 1)]  # newest first, never bc
    assert found["next"] is None
    assert found["messages"][1]["from"] == b.user_id and found["messages"][1]["body"] == (
        f"second {word}"
    )

    # Cursor paging: next is passed back as before; pages never overlap.
    pages: list[list[tuple[str, int]]] = []
    cursor: str | None = None
    while True:
        kw: dict[str, Any] = {"before": cursor} if cursor is not None else {}
        data = await a.request("search", query=word, limit=3, **kw)
        pages.append([(m["conv"], m["seq"]) for m in data["messages"]])
        cursor = data["next"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == [[(ac, 2), (ab, 2), (ac, 1)], [(ab, 1)]]

    one = await a.request("search", query=word, conv=ab)
    assert [(m["conv"], m["seq"]) for m in one["messages"]] == [(ab, 2), (ab, 1)]
    # prefix match on the last word
    assert len((await a.request("search", query=word[:6]))["messages"]) >= 4

    await refused(a.request("search", query=word, conv=bc), "forbidden")
    await refused(a.request("search", query=word, before="not a cursor!"), "bad_request", "before")
    await refused(a.request("search", query=""), "bad_request", "query")
    await refused(a.request("search", query="q" * 201), "bad_request", "query")
    await refused(a.request("search", query=word, limit=0), "bad_request", "limit")
    await refused(a.request("search", query=word, limit=101), "bad_request", "limit")

    # Edits change what matches; recalled messages disappear.
    other = "yq" + uuid.uuid4().hex[:10]
    await a.request("edit", conv=ab, cid=new_cid(), target=1, body=f"now {other}")
    await c.request("recall", conv=ac, cid=new_cid(), target=2)
    found = await a.request("search", query=word)
    assert [(m["conv"], m["seq"]) for m in found["messages"]] == [(ab, 2), (ac, 1)]
    found = await b.request("search", query=other)
    assert [(m["conv"], m["seq"], m["body"]) for m in found["messages"]] == [
        (ab, 1, f"now {other}")
    ]
    assert (await c.request("search", query=other))["messages"] == []


async def test_search_any_text_is_searched_as_text(
    shared_server: ServerProcess, clients: Clients, wire: Wire
) -> None:
    """NUL, other control characters and FTS5 syntax in a query are text: a NUL
    separates words like punctuation does. Not Unicode text (a lone surrogate) is a
    malformed frame. The connection serves on after each."""
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    word = "nq" + uuid.uuid4().hex[:10]
    for body in (f"{word}\x00quagga", f"{word} quagga", f"{word}, quagga!", f"quagga {word}"):
        await a.send_message(conv, body)  # seqs 1-4
    for query in (f"{word}\x00quagga", f"\x00{word}\x00\x00quag\x00", f"{word}\x01quagga"):
        found = await b.request("search", query=query)
        assert [(m["seq"], m["body"]) for m in found["messages"]] == [
            (3, f"{word}, quagga!"),
            (2, f"{word} quagga"),
            (1, f"{word}\x00quagga"),
        ], query
    for query in ("\x00", "\x00 \x00\t", f'\x00"{word}" NEAR(\x00) OR *\x00'):
        assert (await b.request("search", query=query))["messages"] == [], query
    assert await b.ping() == {}

    # A lone surrogate: JSON's \ud800 escape, or its UTF-8-like bytes in MessagePack.
    if wire.codec == "json":
        await b.send_raw('{"op":"search","rid":"s1","query":"zebra \\ud800"}')
    else:
        await b.send_raw(b"\x83\xa2op\xa6search\xa3rid\xa2s1\xa5query\xa3\xed\xa0\x80")
    reply = await b.next_event("reply")
    assert (reply["ok"], reply["error"]["code"]) == (False, "bad_request"), reply
    assert (await b.request("search", query=word))["messages"][0]["seq"] == 4
    assert await b.ping() == {}


async def test_search_default_limit(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    word = "wq" + uuid.uuid4().hex[:10]
    futs = [
        a.request_nowait("send", conv=conv, cid=f"s{i}", type="text", body=f"{word} {i}")
        for i in range(25)
    ]
    await asyncio.gather(*futs)
    first = await b.request("search", query=word)
    assert [m["seq"] for m in first["messages"]] == list(range(25, 5, -1))  # 20 by default
    assert isinstance(first["next"], str)
    rest = await b.request("search", query=word, before=first["next"])
    assert [m["seq"] for m in rest["messages"]] == [5, 4, 3, 2, 1]
    assert rest["next"] is None


# --- blocking -------------------------------------------------------------------------


async def test_block_and_unblock(shared_server: ServerProcess, clients: Clients) -> None:
    a = await clients.user(shared_server, "a")
    b = await clients.user(shared_server, "b")
    conv = dm(a, b)
    before = await a.send_message(conv, "before the block", cid="pre-block")
    await next_msg(b, conv)

    assert await b.request("block", user=a.user_id) == {}
    await refused(a.send_message(conv, "blocked"), "forbidden")
    await refused(a.request("edit", conv=conv, cid=new_cid(), target=1, body="x"), "forbidden")
    await refused(a.request("react", conv=conv, cid=new_cid(), target=1, emoji="👍"), "forbidden")
    # A retry of what was stored before the block is still a duplicate, not an error.
    assert await a.send_message(conv, "before the block", cid="pre-block") == {
        **before,
        "dup": True,
    }
    assert await a.ping() == {}
    assert [m["seq"] for m in await all_messages(b, conv)] == [1]
    assert await b.events_before_ping("msg") == []
    # One-way: B still writes to A.
    assert (await b.send_message(conv, "I can still talk"))["seq"] == 2
    assert (await next_msg(a, conv))["seq"] == 2
    # A may still recall its own earlier message.
    recall = await a.request("recall", conv=conv, cid=new_cid(), target=1)
    assert recall["seq"] == 3
    assert (await next_msg(b, conv))["type"] == "recall"

    assert await b.request("unblock", user=a.user_id) == {}
    ack = await a.send_message(conv, "after unblock")
    assert (ack["seq"], ack["dup"]) == (4, False)
    ev = await next_msg(b, conv)
    assert (ev["seq"], ev["body"]) == (4, "after unblock")
    assert [m["seq"] for m in await all_messages(b, conv)] == [1, 2, 3, 4]
