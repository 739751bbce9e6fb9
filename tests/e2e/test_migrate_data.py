"""``imserver migrate-data`` (docs/operations.md, "Moving from SQLite to a database
server"): a data directory written by a real embedded server is moved to PostgreSQL
and to MariaDB by the command itself (a process of its own), then a server started on
the target answers as the old one did; and the command's refusals.

The SQLite files of the moved services are taken out of the data directory before
the server starts on the target, so everything it answers comes from the server
database (the uploaded files and the Web Push key stay, as documented).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import alembic.command
import databases as dbs
import pytest
from databases import ServerDatabase, ServerDatabases, rows
from PIL import Image

from imserver.client import Client, ClientError, HttpClient
from imserver.services.message.service import MIGRATIONS as MESSAGE_MIGRATIONS
from imserver.storage.sql import alembic_config, sqlite_url
from imserver.testing.process import toml_dumps

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerProcess

pytestmark = pytest.mark.sqlite_source

Frame = dict[str, Any]
MOVED = ("user", "message", "room", "file", "notification")
PASSWORD = "correct-horse-battery"


@pytest.fixture(params=["postgresql", "mariadb"])
async def target(
    request: pytest.FixtureRequest, server_databases: ServerDatabases
) -> ServerDatabase:
    """An empty database on the server of the parameter (``tests/databases.py``)."""
    database = await server_databases.get(request.param)
    await server_databases.empty(database)
    return database


async def migrate_data(*args: str) -> tuple[int, str, str]:
    """``imserver migrate-data ARGS`` in a process of its own: (status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imserver",
        "migrate-data",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def error_line(err: str) -> str:
    """The command's one line of refusal (the last line of stderr)."""
    return err.strip().splitlines()[-1]


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, "PNG")
    return out.getvalue()


async def upload(server: ServerProcess, client: Client, conv: str, data: bytes, name: str) -> Frame:
    async with HttpClient(server.http_url, token=client.token) as http:
        status, _, raw = await http.post(
            "/api/v1/files",
            data,
            params={"conv": conv, "name": name},
            headers={"Content-Type": "application/octet-stream"},
        )
    assert status == 200, raw
    info: Frame = json.loads(raw)["file"]
    return info


async def download(server: ServerProcess, client: Client, path: str) -> tuple[int, bytes]:
    async with HttpClient(server.http_url) as http:
        status, _, body = await http.get(path, token=client.token)
    return status, body


async def account(server: ServerProcess, username: str, device: str = "laptop") -> Client:
    """A new account ``username``, logged in on a new WebSocket connection."""
    client = await Client.connect(server.ws_url)
    await client.register(username, PASSWORD, username.title())
    await client.login(username, PASSWORD, device=device)
    return client


async def full_history(client: Client, conv: str) -> list[Frame] | str:
    """Every message of ``conv``, or the error code of a refusal (an invitee's)."""
    messages: list[Frame] = []
    after = 0
    while True:
        try:
            page = await client.history(conv, after=after, limit=100)
        except ClientError as exc:
            return exc.code
        messages += page["messages"]
        if not page["has_more"]:
            return messages
        after = messages[-1]["seq"]


async def search_all(client: Client, query: str) -> list[tuple[str, int]]:
    found = await client.request("search", {"query": query, "limit": 100})
    return [(m["conv"], m["seq"]) for m in found["messages"]]


QUERIES = ("quick", "fox jump", "cafe", "zèbre", "edited words", "recalled", "bonjour tout")


class World:
    """The data a real embedded server wrote, and what its users saw of it."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, tuple[str, str]] = {}
        self.convs: dict[str, list[Frame]] = {}
        self.histories: dict[tuple[str, str], list[Frame] | str] = {}
        self.searches: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.files: dict[str, tuple[Frame, bytes, bytes]] = {}
        self.sent: dict[str, tuple[str, str, int]] = {}
        """name -> (conv, cid, seq) of a message a test resends."""

    async def build(self, server: ServerProcess, tag: str) -> None:
        alice = self.clients["alice"] = await account(server, f"alice_{tag}")
        bob = self.clients["bob"] = await account(server, f"bob_{tag}")
        carol = self.clients["carol"] = await account(server, f"carol_{tag}")
        boss = self.clients["boss"] = await account(server, f"boss_{tag}")
        # A second device of Alice's: its tokens are used after the move.
        phone = await account_login(server, f"alice_{tag}", "phone")
        assert phone.token is not None and phone.refresh_token is not None
        self.tokens["alice-phone"] = (phone.token, phone.refresh_token)
        await phone.close()

        dm = Client.direct_conv(alice.user_id, bob.user_id)
        first = await alice.send_message(dm, "the quick brown fox", cid="dm-1")
        self.sent["dm-first"] = (dm, "dm-1", first["seq"])
        await bob.send_message(dm, "un café, s'il vous plaît", cid="dm-2")
        # U+0000, which PostgreSQL stores escaped, and a four-byte character (utf8mb4).
        await bob.send_message(dm, "nul\u0000inside \U0001f98a and \ue000", cid="dm-nul")
        typo = await alice.send_message(dm, "some wrong words", cid="dm-3")
        await alice.request(
            "edit", {"conv": dm, "cid": "dm-4", "target": typo["seq"], "body": "edited words here"}
        )
        gone = await bob.send_message(dm, "this will be recalled", cid="dm-5")
        await bob.request("recall", {"conv": dm, "cid": "dm-6", "target": gone["seq"]})
        for who, emoji, cid in ((bob, "👍", "r-1"), (alice, "👍", "r-2"), (bob, "🦊", "r-3")):
            await who.request(
                "react", {"conv": dm, "cid": cid, "target": first["seq"], "emoji": emoji}
            )
        await alice.send_message(
            dm, "a reply that jumps", cid="dm-7", reply_to=first["seq"], mentions=[bob.user_id]
        )
        image = png((640, 480))
        info = await upload(server, alice, dm, image, "blue.png")
        assert info["thumb_url"]
        await alice.send_message(dm, "", cid="dm-8", type="image", meta={"file": info["id"]})
        status, thumb = await download(server, bob, info["thumb_url"])
        assert status == 200
        self.files["image"] = (info, image, thumb)
        await bob.request("read", {"conv": dm, "seq": first["seq"] + 2})

        room = (await alice.request("room.create", {"name": f"Zèbres {tag}", "public": False}))[
            "room"
        ]
        rconv = f"r:{room['id']}"
        await alice.request("room.invite", {"room": room["id"], "user": bob.user_id})
        await bob.request("room.join", {"room": room["id"]})
        await alice.request("room.role", {"room": room["id"], "user": bob.user_id, "role": "admin"})
        await bob.request("room.invite", {"room": room["id"], "user": carol.user_id})  # pending
        await alice.request(
            "room.create", {"name": f"Public {tag}", "public": True, "topic": "for everyone"}
        )
        for i in range(130):  # more than one page of history
            await (alice if i % 2 else bob).send_message(rconv, f"zèbre number {i}", cid=f"z-{i}")
        last = await bob.send_message(rconv, "bonjour tout le monde", cid="room-last")
        self.sent["room-last"] = (rconv, "room-last", last["seq"])
        doc = b"%PDF-1.4 not really a pdf" * 50
        finfo = await upload(server, bob, rconv, doc, "notes.pdf")
        await bob.send_message(
            rconv, "the notes", cid="room-file", type="file", meta={"file": finfo["id"]}
        )
        self.files["doc"] = (finfo, doc, b"")
        await alice.request("read", {"conv": rconv, "seq": last["seq"]})
        await carol.request("block", {"user": alice.user_id})

        notice = await boss.request(
            "notice.broadcast", {"body": "maintenance tonight", "to": "all", "cid": "n-1"}
        )
        assert notice["reached"] >= 4

    async def observe(self) -> None:
        """What every user sees: ``convs``, each conversation's history, search."""
        for name, client in self.clients.items():
            convs = await client.convs()
            self.convs[name] = convs
            for conv in convs:
                key = (name, conv["conv"])
                self.histories[key] = await full_history(client, conv["conv"])
            for query in QUERIES:
                self.searches[(name, query)] = await search_all(client, query)

    def check_what_was_seen(self) -> None:
        """The data is what the comparison after the move needs: nothing vacuous."""
        dm, _, first = self.sent["dm-first"]
        room, _, _ = self.sent["room-last"]
        assert self.searches[("alice", "quick")] == [(dm, first)]
        assert self.searches[("bob", "cafe")] == [(dm, first + 1)]
        assert self.searches[("alice", "edited words")] == [(dm, first + 3)]
        assert self.searches[("bob", "recalled")] == []
        assert len(self.searches[("alice", "zèbre")]) == 100
        assert self.searches[("carol", "zèbre")] == []  # invited, not a member
        assert self.histories[("carol", room)] == "forbidden"
        bob_dm = next(c for c in self.convs["bob"] if c["conv"] == dm)
        assert bob_dm["unread"] > 0
        history = self.histories[("bob", dm)]
        assert isinstance(history, list)
        first_message = history[0]
        assert first_message["reactions"] == {
            "👍": [self.clients["bob"].user_id, self.clients["alice"].user_id],
            "🦊": [self.clients["bob"].user_id],
        }
        assert any(m.get("recalled") for m in history)
        assert any(m["body"] == "nul\u0000inside \U0001f98a and \ue000" for m in history)
        assert any(m.get("edited") for m in history)
        assert {c["conv"][:2] for c in self.convs["carol"]} == {"r:", "s:"}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients.values()))
        self.clients.clear()


async def account_login(server: ServerProcess, username: str, device: str) -> Client:
    client = await Client.connect(server.ws_url)
    await client.login(username, PASSWORD, device=device)
    return client


async def relogin(server: ServerProcess, tag: str) -> World:
    """The same users, logged in again with their old passwords."""
    again = World()
    for name in ("alice", "bob", "carol", "boss"):
        again.clients[name] = await account_login(server, f"{name}_{tag}", "laptop")
    return again


def seq_of_last(world: World, name: str, conv: str) -> int:
    history = world.histories[(name, conv)]
    assert isinstance(history, list)
    return int(history[-1]["seq"])


def take_out_moved_files(data_dir: Path, to: Path) -> None:
    to.mkdir()
    for service in MOVED:
        for suffix in (".db", ".db-wal", ".db-shm"):
            path = data_dir / f"{service}{suffix}"
            if path.exists():
                path.rename(to / path.name)


async def test_a_data_directory_moves_to_a_database_server(
    server_factory: Any, target: ServerDatabase, tmp_path: Path
) -> None:
    tag = target.dialect[:2]
    server: ServerProcess = server_factory({"admins": [f"boss_{tag}"]})
    world = World()
    await world.build(server, tag)
    await world.observe()
    world.check_what_was_seen()
    await world.close()
    server.stop()

    status, out, err = await migrate_data("--from", str(server.data_dir), "--to", target.url)
    assert status == 0, err
    assert "verified: " in out
    assert "DIFFERS" not in out
    report = {
        (line.split()[0], line.split()[1]): line.split()[2:]
        for line in out.splitlines()
        if line.split() and line.split()[0] in MOVED
    }
    [stored] = await rows(target.url, "SELECT count(*) FROM messages")
    assert report[("message", "messages")] == [str(stored[0]), str(stored[0]), "ok"]
    assert stored[0] > 140
    assert "user.users" in err  # the progress bar, on stderr

    # Run again: the target is no longer empty.
    status, _, err = await migrate_data("--from", str(server.data_dir), "--to", target.url)
    assert status == 4, err
    assert error_line(err).startswith(
        "imserver: migrate-data: the target is not empty: user: users (4 rows), "
    )
    assert error_line(err).endswith("; migrate-data copies into empty databases only")

    take_out_moved_files(server.data_dir, tmp_path / "old-sqlite")
    assert not (server.data_dir / "notification.db").exists()
    server.start({"storage": {"url": target.url}})

    after = await relogin(server, tag)
    try:
        await after.observe()
        assert after.convs == world.convs
        assert after.histories == world.histories
        assert after.searches == world.searches

        alice, bob = after.clients["alice"], after.clients["bob"]
        # The old device's tokens: access and refresh.
        access, refresh = world.tokens["alice-phone"]
        async with await Client.connect(server.ws_url) as phone:
            assert (await phone.auth(access))["user"]["id"] == alice.user_id
        async with await Client.connect(server.ws_url) as phone:
            fresh = await phone.refresh(refresh)
            assert fresh["token"] and fresh["token"] != access
        # An idempotent resend is answered with the original seq.
        conv, cid, seq = world.sent["dm-first"]
        resent = await alice.send_message(conv, "the quick brown fox", cid=cid)
        assert (resent["seq"], resent["dup"]) == (seq, True)
        # The next message of each conversation continues at last seq + 1.
        dm_last = seq_of_last(world, "alice", conv)
        assert (await bob.send_message(conv, "after the move"))["seq"] == dm_last + 1
        rconv, rcid, _ = world.sent["room-last"]
        room_last = seq_of_last(world, "bob", rconv)
        assert (await bob.send_message(rconv, "after the move"))["seq"] == room_last + 1
        assert (await bob.send_message(rconv, "bonjour tout", cid=rcid))["dup"] is True
        # Files and thumbnails download from the blobs left in the data directory.
        info, image, thumb = world.files["image"]
        assert await download(server, bob, info["url"]) == (200, image)
        assert await download(server, bob, info["thumb_url"]) == (200, thumb)
        finfo, doc, _ = world.files["doc"]
        assert await download(server, alice, finfo["url"]) == (200, doc)
        # Carol's block came along.
        with pytest.raises(ClientError) as refused:
            await alice.send_message(
                Client.direct_conv(alice.user_id, after.clients["carol"].user_id), "hi"
            )
        assert refused.value.code == "forbidden"
    finally:
        await after.close()


async def test_what_is_refused_before_anything_is_copied(
    server_factory: Any, tmp_path: Path
) -> None:
    nowhere = tmp_path / "nowhere"
    url = "postgresql://postgres@127.0.0.1:5432/never_used"
    status, out, err = await migrate_data("--from", str(nowhere), "--to", url)
    assert (status, out) == (2, "")
    assert error_line(err) == f"imserver: migrate-data: {nowhere}: no such directory"

    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, err = await migrate_data("--from", str(empty), "--to", url)
    assert (status, out) == (2, "")
    assert error_line(err) == (
        f"imserver: migrate-data: {empty} holds no IMServer data "
        "(missing: user.db, message.db, room.db, file.db, notification.db)"
    )
    assert list(empty.iterdir()) == []  # nothing created there

    server: ServerProcess = server_factory(start=False)
    server.start()
    server.stop()
    status, out, err = await migrate_data("--from", str(server.data_dir))  # no --to
    assert (status, out) == (2, "")
    assert error_line(err) == (
        "imserver: migrate-data: the user database would be SQLite: give --to URL (or "
        "storage.url, storage.user.url) naming a PostgreSQL or MySQL/MariaDB database"
    )

    # A server that does not answer: nothing is copied.
    status, out, err = await migrate_data(
        "--from", str(server.data_dir), "--to", "postgresql://postgres@127.0.0.1:9/nowhere"
    )
    assert (status, out) == (1, "")
    line = error_line(err)
    assert line.startswith("imserver: migrate-data: the target's migrations failed: ")
    assert line.endswith("; nothing was copied")

    status, _, err = await migrate_data("--from", str(server.data_dir), "--batch", "0")
    assert status == 2
    assert "argument --batch: 0 is not 1 or more" in err

    # A file that is not a SQLite database.
    (server.data_dir / "room.db").write_bytes(b"not a database, " * 512)
    status, out, err = await migrate_data("--from", str(server.data_dir), "--to", url)
    assert (status, out) == (2, "")
    assert error_line(err) == (
        f"imserver: migrate-data: {server.data_dir.resolve() / 'room.db'} cannot be read: "
        "file is not a database"
    )


async def test_a_data_directory_in_use_is_refused(
    server_factory: Any, target: ServerDatabase
) -> None:
    server: ServerProcess = server_factory()
    alice = await account(server, f"alice_busy_{target.dialect[:2]}")
    try:
        status, out, err = await migrate_data("--from", str(server.data_dir), "--to", target.url)
        assert (status, out) == (3, "")
        assert error_line(err) == (
            f"imserver: migrate-data: {server.data_dir.resolve()} is in use: user.db is open "
            "in another process (database is locked); stop the server first"
        )
        # Nothing was created on the target, and the server serves on.
        assert await tables_of(target) == 0
        bob = await account(server, f"bob_busy_{target.dialect[:2]}")
        await bob.close()
        dm = Client.direct_conv(alice.user_id, str(bob.user_id))
        assert (await alice.send_message(dm, "still here"))["seq"] == 1
    finally:
        await alice.close()


async def tables_of(target: ServerDatabase) -> int:
    schema = "'public'" if target.dialect == "postgresql" else "DATABASE()"
    [(n,)] = await rows(
        target.url, f"SELECT count(*) FROM information_schema.tables WHERE table_schema = {schema}"
    )
    return int(n)


async def test_verify_only_finds_a_copy_that_differs(
    server_factory: Any, target: ServerDatabase
) -> None:
    tag = target.dialect[:2]
    server: ServerProcess = server_factory()
    alice = await account(server, f"alice_v_{tag}")
    bob = await account(server, f"bob_v_{tag}")
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    for i in range(5):
        await alice.send_message(dm, f"message {i}")
    await alice.close()
    await bob.close()
    server.stop()
    source = str(server.data_dir)

    status, out, err = await migrate_data("--from", source, "--to", target.url, "--batch", "2")
    assert status == 0, err
    status, out, err = await migrate_data("--from", source, "--to", target.url, "--verify-only")
    assert status == 0, err
    assert "migrated" not in out  # nothing applied, nothing copied
    assert "verified: 28 checks, " in out  # 25 + the three outboxes

    await rows(target.url, "UPDATE messages SET body = 'tampered' WHERE seq = 2")
    await rows(target.url, "DELETE FROM conv_seqs")
    status, out, err = await migrate_data("--from", source, "--to", target.url, "--verify-only")
    assert status == 5, err
    assert error_line(err) == (
        "imserver: migrate-data: the copy differs from the source: "
        "message.messages, message.conv_seqs"
    )
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()}
    assert lines[("message", "messages")] == ["5", "5", "DIFFERS"]
    assert lines[("message", "conv_seqs")] == ["1", "0", "DIFFERS"]
    assert lines[("message", "markers")][-1] == "ok"


async def test_a_service_of_its_own_database_and_an_older_data_directory(
    server_factory: Any, target: ServerDatabase, tmp_path: Path
) -> None:
    tag = target.dialect[:2]
    server: ServerProcess = server_factory()
    alice = await account(server, f"alice_o_{tag}")
    bob = await account(server, f"bob_o_{tag}")
    dm = Client.direct_conv(alice.user_id, bob.user_id)
    for i in range(3):
        await alice.send_message(dm, f"message {i}")
    before = await full_history(bob, dm)
    await alice.close()
    await bob.close()
    server.stop()
    # The message database as an older IMServer left it (these revisions change
    # nothing on SQLite but the version).
    message_db = sqlite_url(server.data_dir, "message")
    await asyncio.to_thread(
        alembic.command.downgrade, alembic_config(message_db, MESSAGE_MIGRATIONS), "message_0003"
    )
    assert await rows(message_db, "SELECT version_num FROM alembic_version_message") == [
        ("message_0003",)
    ]

    messages = dbs.create_database(target.dialect, "move")
    try:
        settings = {"storage": {"message": {"url": messages.url}}}
        config = tmp_path / "move.toml"
        config.write_text(toml_dumps(settings))
        status, out, err = await migrate_data(
            "--config", str(config), "--from", str(server.data_dir), "--to", target.url
        )
        assert status == 0, err
        migrated = dict(
            line.split("\t")[1:3] for line in out.splitlines() if line.startswith("migrated\t")
        )
        assert migrated["message"].endswith(f"/{messages.name}?charset=utf8mb4") or migrated[
            "message"
        ].endswith(f"/{messages.name}")
        assert target.name in migrated["user"] and target.name in migrated["room"]
        assert await rows(message_db, "SELECT version_num FROM alembic_version_message") == [
            ("message_0006",)
        ]
        assert await rows(messages.url, "SELECT count(*) FROM messages") == [(3,)]
        assert await rows(target.url, "SELECT count(*) FROM users") == [(2,)]
        assert await table_count(target, "messages") == 0  # only in its own database

        take_out_moved_files(server.data_dir, tmp_path / "old-sqlite")
        server.start({"storage": {"url": target.url, "message": {"url": messages.url}}})
        bob = await account_login(server, f"bob_o_{tag}", "laptop")
        try:
            assert await full_history(bob, dm) == before
            assert (await bob.send_message(dm, "next"))["seq"] == 4
        finally:
            await bob.close()
        server.stop()
    finally:
        dbs.drop_database(messages)


async def table_count(target: ServerDatabase, name: str) -> int:
    schema = "'public'" if target.dialect == "postgresql" else "DATABASE()"
    [(n,)] = await rows(
        target.url,
        "SELECT count(*) FROM information_schema.tables "
        f"WHERE table_schema = {schema} AND table_name = '{name}'",
    )
    return int(n)


@pytest.mark.parametrize("server", ["mariadb"])
async def test_a_mariadb_database_that_ignores_case_is_refused(
    server: str, server_databases: ServerDatabases, server_factory: Any
) -> None:
    database = await server_databases.get(server)
    await dbs.admin(
        "mariadb",
        [
            f"DROP DATABASE {database.name}",
            f"CREATE DATABASE {database.name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
        ],
    )
    try:
        source: ServerProcess = server_factory()
        source.stop()
        status, out, err = await migrate_data("--from", str(source.data_dir), "--to", database.url)
        assert (status, out) == (2, "")
        assert error_line(err) == (
            "imserver: migrate-data: the database's collation is utf8mb4_general_ci: "
            "IMServer needs a binary utf8mb4 one (CREATE DATABASE ... CHARACTER SET "
            "utf8mb4 COLLATE utf8mb4_bin)"
        )
        assert await rows(database.url, "SHOW TABLES") == []
    finally:
        await server_databases.empty(database)
