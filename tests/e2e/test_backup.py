"""End-to-end tests of ``imserver backup`` and ``imserver restore`` (docs/operations.md,
"Backups"): a backup taken from a running server while clients keep sending messages
and uploading files, restored into a fresh data directory and served again; and the
refusals, with their exact messages and exit codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from imserver.client import Client, HttpClient

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import Account, Clients, ServerFactory, ServerProcess

# The backup of an embedded deployment: its servers keep their data in SQLite files.
pytestmark = pytest.mark.sqlite_only

Frame = dict[str, Any]
DATABASES = ["file.db", "message.db", "notification.db", "room.db", "user.db"]


async def imserver(*args: str | Path) -> tuple[int, str, str]:
    """Run ``imserver ARGS`` in a process of its own; ``(exit code, stdout, stderr)``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imserver",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, IMSERVER_LOG_LEVEL="warning"),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def upload(
    server: ServerProcess, client: Client, conv: str, data: bytes, name: str = "doc.bin"
) -> Frame:
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


async def download(server: ServerProcess, client: Client, path: str) -> bytes:
    async with HttpClient(server.http_url) as http:
        status, _, body = await http.get(path, token=client.token)
    assert status == 200, body
    return body


async def full_history(c: Client, conv: str) -> list[Frame]:
    messages: list[Frame] = []
    after = 0
    while True:
        page = await c.history(conv, after=after, limit=200)
        messages.extend(page["messages"])
        if not page["has_more"]:
            return messages
        after = page["messages"][-1]["seq"]


@dataclass
class Load:
    """Clients that keep writing until told to stop, and what they were acked."""

    acks: list[tuple[float, Frame]] = field(default_factory=list)
    """(monotonic time of the ack, reply data) of every acknowledged send."""
    uploads: dict[str, bytes] = field(default_factory=dict)
    """File id → the bytes uploaded."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    warm: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once 200 sends and two uploads were acknowledged."""

    def acked(self, data: Frame) -> None:
        self.acks.append((time.monotonic(), data))
        if len(self.acks) >= 200 and len(self.uploads) >= 2:
            self.warm.set()

    async def sender(self, c: Client, conv: str, tag: str) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            data = await c.send_message(conv, f"{tag} {i}", cid=f"{tag}-{i}")
            self.acked(data)
            await asyncio.sleep(0.005)  # at most 200 sends a second: under the rate limit

    async def uploader(self, server: ServerProcess, c: Client, conv: str) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            content = os.urandom(200_000 + i)
            info = await upload(server, c, conv, content)
            self.uploads[info["id"]] = content
            data = await c.send_message(
                conv, "", cid=f"file-{i}", type="file", meta={"file": info["id"]}
            )
            self.acked(data)

    def acked_before(self, instant: float) -> list[Frame]:
        return [data for at, data in self.acks if at < instant]


async def test_backup_while_serving_restores_every_acked_message_file_and_login(
    server_factory: ServerFactory, clients: Clients, register_user: Any
) -> None:
    server = server_factory({"limits": {"rate_per_s": 1000}})
    accounts: list[Account] = [await register_user(server, n) for n in ("a", "b", "c")]
    a, b, c = [await clients.connect(server, login_as=acc) for acc in accounts]
    room = (await a.request("room.create", name="backup room", members=[accounts[1].id]))["room"]
    convs = {
        "ab": Client.direct_conv(accounts[0].id, accounts[1].id),
        "ac": Client.direct_conv(accounts[0].id, accounts[2].id),
        "room": room["conv"],
    }
    picture = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 90)).save(picture, "PNG")
    image = await upload(server, a, convs["room"], picture.getvalue(), "picture.png")
    assert image["thumb_url"]
    await a.send_message(convs["room"], "", type="image", meta={"file": image["id"]})
    thumb = await download(server, b, image["thumb_url"])
    load = Load()
    load.uploads[image["id"]] = picture.getvalue()
    writers = [
        asyncio.create_task(load.sender(a, convs["ab"], "ab-a")),
        asyncio.create_task(load.sender(b, convs["ab"], "ab-b")),
        asyncio.create_task(load.sender(c, convs["ac"], "ac-c")),
        asyncio.create_task(load.sender(b, convs["room"], "room-b")),
        asyncio.create_task(load.uploader(server, a, convs["room"])),
    ]
    try:
        await asyncio.wait_for(load.warm.wait(), 60)
        target = server.root / "backup"
        started = time.monotonic()
        code, out, err = await imserver("backup", target, "--data-dir", server.data_dir)
        finished = time.monotonic()
        assert (code, err) == (0, ""), out
        # The clients kept being acknowledged while the backup ran.
        during = [at for at, _ in load.acks if started < at < finished]
        assert len(during) >= 20, f"only {len(during)} acks during the backup"
        await asyncio.sleep(0.2)
    finally:
        load.stop.set()
        await asyncio.gather(*writers)
    acked = load.acked_before(started)
    assert out.splitlines()[-1].startswith(f"backup of {server.data_dir.resolve()} as of ")

    # The backup: every database passes SQLite's integrity check; every file matches
    # the manifest.
    manifest = json.loads((target / "manifest.json").read_text())
    assert sorted(e["path"] for e in manifest["entries"] if e["kind"] == "database") == DATABASES
    for name in DATABASES:
        with sqlite3.connect(target / name) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    for entry in manifest["entries"]:
        data = (target / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
    assert manifest["missing_blobs"] == []

    # A running server's data directory is refused as a restore target.
    code, out, err = await imserver("restore", target, "--data-dir", server.data_dir)
    assert (code, out) == (1, "")
    assert err == (
        f"imserver: data directory {server.data_dir} is not empty: restore needs an empty one\n"
    )

    vapid_key = (await a.request("push.vapid_key"))["key"]
    restored = server_factory({"limits": {"rate_per_s": 1000}}, start=False)
    code, out, err = await imserver("restore", target, "--data-dir", restored.data_dir)
    assert (code, err) == (0, ""), out
    await server.astop()
    restored.start()

    # Logins and tokens work: a password, and tokens issued before the backup.
    assert (await (await clients.connect(restored)).auth(a.token))["user"]["id"] == accounts[0].id
    a2 = await clients.connect(restored, login_as=accounts[0])
    b2 = await clients.connect(restored)
    assert (await b2.auth(b.token))["user"]["id"] == accounts[1].id
    c2 = await clients.connect(restored)
    assert (await c2.auth(c.token))["user"]["id"] == accounts[2].id

    # The web push key came along: subscriptions made before keep working.
    assert (await a2.request("push.vapid_key"))["key"] == vapid_key

    readers = {"ab": a2, "ac": a2, "room": b2}
    restored_count = 0
    for name, conv in convs.items():
        history = await full_history(readers[name], conv)
        seqs = [m["seq"] for m in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"{name}: a gap in {seqs}"
        stored = {m["seq"]: m for m in history}
        restored_count += len(history)
        for data in (d for d in acked if d["conv"] == conv):
            message = stored.get(data["seq"])
            assert message is not None, f"{name}: acked seq {data['seq']} lost"
            assert (message["cid"], message["ts"]) == (data["cid"], data["ts"])
        # Every file a restored message names is readable, byte for byte.
        for message in history:
            if message["type"] in ("file", "image"):
                file_id = message["meta"]["file"]
                body = await download(restored, b2, f"/api/v1/files/{file_id}")
                assert body == load.uploads[file_id]
        # Idempotency keys came along: a resend answers the original seq and ts.
        tag, client = {"ab": ("ab-a-", a2), "ac": ("ac-c-", c2), "room": ("room-b-", b2)}[name]
        last = [d for d in acked if d["conv"] == conv and d["cid"].startswith(tag)][-1]
        assert await client.send_message(conv, "again", cid=last["cid"]) == {**last, "dup": True}
        # The sequence continues after the restored history.
        new = await readers[name].send_message(conv, "after the restore")
        assert (new["seq"], new["dup"]) == (len(history) + 1, False)
    # The snapshot was taken while the clients wrote: it holds more than was acked
    # before the command started (the room's creation message aside).
    assert restored_count > len(acked) + 2
    assert sum(1 for m in await full_history(b2, convs["room"]) if m["type"] == "file") >= 2
    # The thumbnail came along with its image.
    assert await download(restored, b2, image["thumb_url"]) == thumb


# --- refusals -------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: relative path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_backup_refuses_a_missing_or_empty_data_dir_and_a_used_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "backup"
    missing = tmp_path / "nowhere"
    assert await imserver("backup", target, "--data-dir", missing) == (
        1,
        "",
        f"imserver: no data directory at {missing}\n",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert await imserver("backup", target, "--data-dir", empty) == (
        1,
        "",
        f"imserver: {empty} holds no IMServer database (user.db, message.db, …)\n",
    )
    assert not target.exists()

    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    target.mkdir()
    (target / "keep.txt").write_text("an earlier backup")
    for used in (target, target / "keep.txt"):
        assert await imserver("backup", used, "--data-dir", data) == (
            1,
            "",
            f"imserver: backup target {used} is not an empty directory\n",
        )
    assert tree(target) == {"keep.txt": b"an earlier backup"}

    # An empty directory is a fine target, and so is one that does not exist yet.
    for fresh in (tmp_path / "made-empty", tmp_path / "new" / "backup"):
        if fresh.name == "made-empty":
            fresh.mkdir()
        code, out, err = await imserver("backup", fresh, "--data-dir", data)
        assert (code, err) == (0, ""), out
        assert sorted(tree(fresh)) == sorted([*DATABASES, "manifest.json"])


async def test_restore_refuses_a_used_data_dir_and_a_missing_or_damaged_backup(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    backup = tmp_path / "backup"
    assert (await imserver("backup", backup, "--data-dir", data))[0] == 0
    original = tree(backup)

    nothing = tmp_path / "nothing"
    assert await imserver("restore", nothing, "--data-dir", tmp_path / "r0") == (
        1,
        "",
        f"imserver: {nothing} holds no backup (manifest.json is missing)\n",
    )
    used = tmp_path / "used"
    used.mkdir()
    (used / "user.db").write_bytes(b"another deployment")
    assert await imserver("restore", backup, "--data-dir", used) == (
        1,
        "",
        f"imserver: data directory {used} is not empty: restore needs an empty one\n",
    )
    assert tree(used) == {"user.db": b"another deployment"}

    manifest = json.loads((backup / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["path"] == "room.db")
    damaged = bytearray(original["room.db"])
    damaged[-1] ^= 0xFF
    (backup / "room.db").write_bytes(bytes(damaged))
    sha = hashlib.sha256(damaged).hexdigest()
    target = tmp_path / "r1"
    assert await imserver("restore", backup, "--data-dir", target) == (
        1,
        "",
        f"imserver: damaged backup: room.db has {len(damaged)} bytes, SHA-256 {sha}; "
        f"the manifest says {entry['size']} bytes, {entry['sha256']}\n",
    )
    (backup / "room.db").unlink()
    assert await imserver("restore", backup, "--data-dir", target) == (
        1,
        "",
        "imserver: damaged backup: room.db is missing\n",
    )
    # Nothing was written: no data directory, no staging directory beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "data", "used"]

    (backup / "room.db").write_bytes(original["room.db"])
    for fresh in (tmp_path / "r2", tmp_path / "empty"):
        if fresh.name == "empty":
            fresh.mkdir()
        code, out, err = await imserver("restore", backup, "--data-dir", fresh)
        assert (code, err) == (0, ""), out
        assert tree(fresh) == {k: v for k, v in original.items() if k != "manifest.json"}


async def test_backup_copies_the_blobs_file_db_names_and_lists_the_missing(
    tmp_path: Path,
) -> None:
    """A record whose blob is gone (what the clean-up leaves when it deletes an unnamed
    upload between the snapshot and the copy) is listed, not fatal; a blob no record
    names (an upload stored after the snapshot) is not copied."""
    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    blobs = data / "files" / "blobs"
    kept, gone, stray = (hashlib.sha256(x).hexdigest() for x in (b"kept", b"gone", b"stray"))
    for sha, content in ((kept, b"kept"), (stray, b"stray")):
        (blobs / sha[:2]).mkdir(parents=True, exist_ok=True)
        (blobs / sha[:2] / sha).write_bytes(content)
    (blobs / kept[:2] / f"{kept}.thumb").write_bytes(b"thumbnail")
    with sqlite3.connect(data / "file.db") as db:
        for n, (sha, thumb) in enumerate(((kept, "image/jpeg"), (gone, None))):
            db.execute(
                "INSERT INTO files VALUES (?, 'd:u1:u2', 'u1', 'x', 4, 'image/png', ?, ?, 0, ?)",
                (f"f{n}", sha, thumb, "new"),
            )
    db.close()

    backup = tmp_path / "backup"
    code, out, err = await imserver("backup", backup, "--data-dir", data)
    assert (code, err) == (0, "")
    assert f"blob {gone[:2]}/{gone} deleted by the clean-up before it was copied" in out
    assert "files/blobs: 2 blobs, 1 missing" in out.splitlines()
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["missing_blobs"] == [f"{gone[:2]}/{gone}"]
    assert {e["path"]: e["sha256"] for e in manifest["entries"] if e["kind"] == "blob"} == {
        f"files/blobs/{kept[:2]}/{kept}": kept,
        f"files/blobs/{kept[:2]}/{kept}.thumb": hashlib.sha256(b"thumbnail").hexdigest(),
    }
    assert sorted(p for p in tree(backup) if p.startswith("files/")) == [
        f"files/blobs/{kept[:2]}/{kept}",
        f"files/blobs/{kept[:2]}/{kept}.thumb",
    ]


async def test_a_backup_that_cannot_lock_the_databases_fails_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    blocker = sqlite3.connect(data / "room.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for target in (tmp_path / "new", tmp_path / "empty"):
            if target.name == "empty":
                target.mkdir()
            assert await imserver(
                "backup", target, "--data-dir", data, "--lock-timeout", "0.5"
            ) == (
                1,
                "",
                f"imserver: snapshot of {data} failed: the databases stayed busy for 0.5 s\n",
            )
            # The directory it made went again; an empty one it was given stays empty.
            if target.name == "new":
                assert not target.exists()
            else:
                assert list(target.iterdir()) == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    code, _, err = await imserver("backup", tmp_path / "new", "--data-dir", data)
    assert (code, err) == (0, "")


async def test_with_blobs_on_s3_the_backup_says_the_bucket_is_backed_up_apart(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    config = tmp_path / "imserver.toml"
    config.write_text('[files]\nbackend = "s3"\ns3_bucket = "chat-files"\n')
    backup = tmp_path / "backup"
    code, out, err = await imserver("backup", backup, "--config", config, "--data-dir", data)
    assert (code, err) == (0, "")
    assert "blobs are in the S3 bucket 'chat-files': back it up separately" in out.splitlines()
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["files_backend"] == "s3"
    assert [e for e in manifest["entries"] if e["kind"] == "blob"] == []


async def test_services_on_a_database_server_are_named_not_copied(tmp_path: Path) -> None:
    """With ``storage.url`` on PostgreSQL and one service on an SQLite file of its own,
    that file is copied (as ``room.db``) and the others are named, password masked.
    The backup connects to no server: nothing here needs one."""
    data = tmp_path / "data"
    assert (await imserver("migrate", "--data-dir", data))[0] == 0
    own = tmp_path / "elsewhere" / "rooms.sqlite"
    own.parent.mkdir()
    (data / "room.db").rename(own)
    for name in ("user.db", "message.db", "file.db", "notification.db"):
        (data / name).unlink()  # what a deployment on a server has: no such files
    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n")
    settings = (
        '[storage]\nurl = "postgresql://imserver@db.internal/imserver"\n'
        f'password_file = "{secret}"\n'
    )
    config = tmp_path / "imserver.toml"
    config.write_text(settings + f'[storage.room]\nurl = "sqlite:///{own}"\n')
    backup = tmp_path / "backup"
    code, out, err = await imserver("backup", backup, "--config", config, "--data-dir", data)
    assert (code, err) == (0, "")
    assert "s3cret" not in out
    url = "postgresql+asyncpg://imserver:***@db.internal/imserver"
    servers = ("user", "message", "file", "notification")
    for service in servers:
        line = f"{service}: on {url}, not in this backup (back it up with the database's tools)"
        assert line in out.splitlines()
    assert "files/blobs: not in this backup (copy it after the file database's backup)" in out
    manifest = json.loads((backup / "manifest.json").read_text())
    assert "s3cret" not in json.dumps(manifest)
    assert manifest["elsewhere"] == dict.fromkeys(servers, url)
    assert [e["path"] for e in manifest["entries"] if e["kind"] == "database"] == ["room.db"]
    assert tree(backup)["room.db"] != b""

    # Every service on the server: nothing for this command to copy.
    config.write_text(settings)
    assert await imserver("backup", tmp_path / "b2", "--config", config, "--data-dir", data) == (
        1,
        "",
        "imserver: every service's database is on a database server: back them up with "
        "its tools (docs/operations.md)\n",
    )
    assert not (tmp_path / "b2").exists()
