"""End-to-end tests of durability (docs/protocol.md §4.11, guarantees 1 and 2): what was
acknowledged survives a restart and a crash, seqs and idempotency keys continue
across restarts, and a connection cut between the commit and the ack is repaired by
resending the same ``cid``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from databases import e2e_database

from imserver.client import Client, ClientError, ConnectionClosed

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Account, Clients, ServerFactory, ServerProcess, Wire

Frame = dict[str, Any]


async def all_messages(c: Client, conv: str) -> list[Frame]:
    page = await c.history(conv, after=0, limit=200)
    assert page["has_more"] is False
    messages: list[Frame] = page["messages"]
    return messages


async def next_msg(c: Client, conv: str) -> Frame:
    return await c.next_event("msg", match=lambda e: e.get("conv") == conv)


async def read_all_history(c: Client, conv: str) -> list[Frame]:
    messages: list[Frame] = []
    after = 0
    while True:
        page = await c.history(conv, after=after, limit=200)
        messages.extend(page["messages"])
        if not page["has_more"]:
            return messages
        after = page["messages"][-1]["seq"]


async def entry_of(c: Client, conv: str) -> Frame:
    found = [e for e in await c.convs() if e["conv"] == conv]
    assert len(found) == 1, found
    return found[0]


# --- restart --------------------------------------------------------------------------


@pytest.mark.embedded_only("stops and restarts the one server process on its data directory")
async def test_restart_keeps_history_accounts_tokens_seqs_and_idempotency(
    server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    a_account: Account = await register_user(server, "a")
    b_account: Account = await register_user(server, "b")
    a = await clients.connect(server, "ws", "json", login_as=a_account)
    b = await clients.connect(server, "tcp", "msgpack", login_as=b_account)
    conv = Client.direct_conv(a_account.id, b_account.id)
    word = "kq" + uuid.uuid4().hex[:8]

    acks = [await a.send_message(conv, f"m{i} {word}", cid=f"c{i}") for i in range(1, 4)]
    react = await b.request("react", conv=conv, cid="r1", target=1, emoji="👍")
    edit = await a.request("edit", conv=conv, cid="e1", target=2, body=f"edited {word}")
    assert [x["seq"] for x in [*acks, react, edit]] == [1, 2, 3, 4, 5]
    await b.request("read", conv=conv, seq=2)
    await b.request("recv", conv=conv, seq=3)
    history = await all_messages(a, conv)
    b_entry = await entry_of(b, conv)
    assert (b_entry["last_seq"], b_entry["read_seq"], b_entry["recv_seq"]) == (5, 2, 3)
    token = a.token
    assert token is not None

    code = await server.astop()
    assert code == 0, "SIGTERM should end the server cleanly"
    # Connected clients were told why before the connection ended.
    assert await a.wait_closed(5) == "shutdown"
    assert await b.wait_closed(5) == "shutdown"
    await server.astart()

    # The access token survives: no new login needed.
    a = await clients.connect(server, "tcp", "json")
    assert (await a.auth(token))["user"]["id"] == a_account.id
    # The account survives: its password still logs in.
    b = await clients.connect(server, "ws", "msgpack", login_as=b_account)
    assert b.user_id == b_account.id

    # History, annotations and markers are exactly as before.
    assert await all_messages(b, conv) == history
    assert history[0]["reactions"] == {"👍": [b_account.id]}
    assert history[1]["edited"] is True and history[1]["body"] == f"edited {word}"
    assert await entry_of(b, conv) == b_entry

    # Idempotency keys survive: old cids are duplicates with their original seq and ts.
    for old in acks:
        assert await a.send_message(conv, "again", cid=old["cid"]) == {**old, "dup": True}
    assert await b.request("react", conv=conv, cid="r1", target=1, emoji="👍") == {
        **react,
        "dup": True,
    }
    assert await a.request("edit", conv=conv, cid="e1", target=2, body="x") == {
        **edit,
        "dup": True,
    }

    # The sequence continues at last + 1, and live delivery works again.
    new = await a.send_message(conv, "after the restart", cid="c-new")
    assert (new["seq"], new["dup"]) == (6, False)
    ev = await next_msg(b, conv)
    assert (ev["seq"], ev["cid"], ev["body"]) == (6, "c-new", "after the restart")
    assert [m["seq"] for m in await all_messages(a, conv)] == [1, 2, 3, 4, 5, 6]

    # The search index survived too.
    found = await b.request("search", query=word)
    assert [(m["conv"], m["seq"]) for m in found["messages"]] == [(conv, 3), (conv, 2), (conv, 1)]


@pytest.mark.embedded_only("kills the one server process and reads its SQLite files")
async def test_acknowledged_sends_survive_a_crash(
    server: ServerProcess, clients: Clients, register_user: Any
) -> None:
    a_account: Account = await register_user(server, "a")
    b_account: Account = await register_user(server, "b")
    a = await clients.connect(server, "tcp", "msgpack", login_as=a_account)
    conv = Client.direct_conv(a_account.id, b_account.id)
    futs = [
        a.request_nowait("send", conv=conv, cid=f"k{i:02d}", type="text", body=f"m{i}")
        for i in range(60)
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futs), 30)
    assert [x["seq"] for x in acks] == list(range(1, 61))

    server.kill()  # SIGKILL right after the last ack: no shutdown, no flush
    # A SIGKILL keeps the page cache, so this restart cannot tell whether the commits
    # were fsynced (tests/service/test_durability_settings.py checks that). What the
    # files left behind do show: every database is in WAL mode (bytes 18 and 19 of the
    # header are 2), and message.db's WAL, which the commits were written to, is left
    # for the next start to recover from.
    # (On a database server, IMS_E2E_DATABASE, the server keeps what it acked.)
    if e2e_database() == "sqlite":
        for name in ("user.db", "room.db", "message.db", "file.db"):
            header = (server.data_dir / name).read_bytes()[:100]
            assert header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02", name
        assert (server.data_dir / "message.db-wal").stat().st_size > 0
    await server.astart()

    b = await clients.connect(server, "ws", "json", login_as=b_account)
    stored = await all_messages(b, conv)
    assert [(m["seq"], m["cid"], m["ts"]) for m in stored] == [
        (x["seq"], x["cid"], x["ts"]) for x in acks
    ]
    a = await clients.connect(server, "ws", "msgpack", login_as=a_account)
    assert await a.send_message(conv, "again", cid="k30") == {**acks[30], "dup": True}
    assert (await a.send_message(conv, "next", cid="k-next"))["seq"] == 61


@pytest.mark.embedded_only("stops and restarts the one server process mid-pipeline")
async def test_sigterm_during_a_pipeline_loses_nothing_acknowledged(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    server = server_factory({"limits": {"rate_per_s": 1_000_000, "rate_burst": 1_000_000}})
    a_account: Account = await register_user(server, "a")
    b_account: Account = await register_user(server, "b")
    a = await clients.connect(server, "tcp", "msgpack", login_as=a_account)
    conv = Client.direct_conv(a_account.id, b_account.id)

    # Pipeline sends and stop the server (SIGTERM) while they are in flight.
    sent: list[tuple[str, asyncio.Future[Frame]]] = []
    stopping: asyncio.Task[int | None] | None = None
    for i in range(1000):
        cid = f"t{i:04d}"
        try:
            sent.append((cid, a.request_nowait("send", conv=conv, cid=cid, type="text", body=cid)))
        except ConnectionClosed:
            break
        if i == 200:
            stopping = asyncio.create_task(server.astop())
        if i % 50 == 49:
            await a.drain()
            await asyncio.sleep(0)
    assert stopping is not None
    assert await stopping == 0
    results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
    acked: dict[str, Frame] = {}
    refused: list[str] = []
    unanswered: list[str] = []
    for (cid, _), result in zip(sent, results, strict=True):
        if isinstance(result, dict):
            acked[cid] = result
        elif isinstance(result, ClientError):
            assert result.code == "unavailable", result  # shutting down: not stored
            refused.append(cid)
        else:
            assert isinstance(result, ConnectionClosed), result
            unanswered.append(cid)
    assert acked, "nothing was acknowledged before the shutdown"
    assert [x["seq"] for x in acked.values()] == list(range(1, len(acked) + 1))

    await server.astart()
    b = await clients.connect(server, "ws", "json", login_as=b_account)
    stored = {m["cid"]: m for m in await read_all_history(b, conv)}
    assert [m["seq"] for m in stored.values()] == list(range(1, len(stored) + 1))
    # Every acknowledged send is there with its seq and ts; no refused one is.
    for cid, ack in acked.items():
        assert cid in stored, f"acknowledged {cid} (seq {ack['seq']}) was lost"
        assert (stored[cid]["seq"], stored[cid]["ts"]) == (ack["seq"], ack["ts"])
    assert [cid for cid in refused if cid in stored] == []

    # Unanswered sends are settled by resending them with the same cid.
    a = await clients.connect(server, "tcp", "json", login_as=a_account)
    retry = unanswered + refused
    futs = [a.request_nowait("send", conv=conv, cid=cid, type="text", body=cid) for cid in retry]
    for cid, again in zip(retry, await asyncio.gather(*futs), strict=True):
        if cid in stored:
            assert (again["seq"], again["ts"], again["dup"]) == (
                stored[cid]["seq"],
                stored[cid]["ts"],
                True,
            )
        else:
            assert again["dup"] is False
    final = await read_all_history(b, conv)
    assert [m["seq"] for m in final] == list(range(1, len(sent) + 1))
    assert sorted(m["cid"] for m in final) == sorted(cid for cid, _ in sent)


# --- a cut between commit and ack -----------------------------------------------------


async def test_cut_after_commit_then_resend_is_a_duplicate(
    shared_server: ServerProcess, clients: Clients, register_user: Any, wire: Wire
) -> None:
    a_account: Account = await register_user(shared_server, "a")
    a1 = await clients.connect(shared_server, login_as=a_account)  # the test's wire
    token = a1.token
    assert token is not None
    a2 = await clients.connect(shared_server, "ws", "json")  # A's other device
    await a2.auth(token)
    b = await clients.user(shared_server, "b", transport="tcp", codec="msgpack")
    conv = Client.direct_conv(a_account.id, b.user_id)
    cid = "cut-" + uuid.uuid4().hex

    # Send, then drop the connection at once, never reading the reply.
    frame = {"op": "send", "rid": "r-cut", "conv": conv, "cid": cid, "type": "text", "body": "cut"}
    await a1.send_frame(frame)
    a1.abort()

    # The commit happened: the message reaches B and A's other device.
    ev_b = await next_msg(b, conv)
    ev_a2 = await next_msg(a2, conv)
    assert ev_b == ev_a2
    assert (ev_b["seq"], ev_b["cid"], ev_b["from"], ev_b["body"]) == (1, cid, a_account.id, "cut")

    # Reconnected, A retries the unacknowledged send with the same cid: a duplicate.
    a3 = await clients.connect(shared_server)
    await a3.auth(token)
    ack = await a3.send_message(conv, "cut", cid=cid)
    assert ack == {"conv": conv, "seq": 1, "ts": ev_b["ts"], "cid": cid, "dup": True}
    stored = await all_messages(b, conv)
    assert [(m["seq"], m["cid"]) for m in stored] == [(1, cid)]

    # Again, this time retrying at once, without waiting for any proof of the commit:
    # whichever way the race goes, the message exists exactly once.
    cid2 = "cut2-" + uuid.uuid4().hex
    await a3.send_frame({**frame, "cid": cid2, "body": "cut again"})
    a3.abort()
    a4 = await clients.connect(shared_server)
    await a4.auth(token)
    retry = await a4.send_message(conv, "cut again", cid=cid2)
    assert (retry["seq"], retry["cid"]) == (2, cid2)
    ev = await next_msg(b, conv)
    assert (ev["seq"], ev["cid"], ev["ts"]) == (2, cid2, retry["ts"])
    # B gets nothing more: its next message is the sentinel.
    await a4.send_message(conv, "sentinel", cid="sentinel")
    assert (await next_msg(b, conv))["cid"] == "sentinel"
    stored = await all_messages(b, conv)
    assert [(m["seq"], m["cid"]) for m in stored] == [(1, cid), (2, cid2), (3, "sentinel")]
