"""Redis for the tests and the benchmarks: the machine's server, key prefixes of
one's own, and private ``redis-server`` processes that can be restarted for real.

Tests share the machine's Redis (``127.0.0.1:6379``, or ``IMS_TEST_REDIS``) with
other runs, so each uses a prefix of its own (:func:`unique_prefix`) and deletes its
keys after (:func:`delete_prefix`). A test that breaks connections, and a benchmark
that reads the server's CPU, start a :class:`RedisServer` of their own instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from imserver.testing.process import free_ports

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def shared_url() -> str:
    """The machine's Redis, for tests that share it (``IMS_TEST_REDIS`` overrides)."""
    return os.environ.get("IMS_TEST_REDIS", DEFAULT_URL)


def reachable(url: str) -> str | None:
    """``None`` when the Redis at ``url`` answers a ping, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return f"no Redis at {url}: {exc}"
    return None


def unique_prefix() -> str:
    """A key and channel prefix no other run uses."""
    return f"imstest:{os.getpid()}:{secrets.token_hex(4)}:"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisServer:
    """A ``redis-server`` of one's own on a free port, without persistence, that can
    be stopped, killed and started again on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_ports(1)[0]
        self.dir = Path(tempfile.mkdtemp(prefix="imserver-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115  # the child keeps it
        with log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while (why := reachable(self.url)) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {why}")
            time.sleep(0.05)

    def kill(self) -> None:
        """``kill -9`` the server and reap it: every connection breaks."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def cpu_seconds(self) -> float:
        """User + system CPU the server has used so far (from ``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")
