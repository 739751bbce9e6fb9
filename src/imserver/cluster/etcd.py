"""A single-member etcd for a local cluster or a test: Debian's ``etcd-server``
package, on loopback ports of its own, with its data in a directory of its own.

:class:`LocalEtcd` starts it in the foreground as a child process in its own
process group, waits until ``GET /health`` answers ``"health": "true"``, and stops
it (SIGTERM, then SIGKILL). :meth:`LocalEtcd.start` again reuses the data
directory and the ports, so a test can stop etcd and bring the same one back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from imserver.cluster.ports import free_ports

START_TIMEOUT = 20.0


class EtcdError(RuntimeError):
    """etcd is missing or did not become healthy."""


def binary() -> str | None:
    """The etcd executable (Debian: package ``etcd-server``), or None."""
    return shutil.which("etcd")


class LocalEtcd:
    """One etcd member on ``host``, its data under ``root``."""

    def __init__(self, root: Path, host: str = "127.0.0.1", name: str = "imserver") -> None:
        self.root = root
        self.host = host
        self.name = name
        self.client_port, self.peer_port = free_ports(2, host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL (``http://host:port``)."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def log_path(self) -> Path:
        """Where etcd's output goes."""
        return self.root / "etcd.log"

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def command(self) -> list[str]:
        """The etcd command line."""
        exe = binary()
        if exe is None:
            raise EtcdError("etcd is not installed (Debian: apt-get install etcd-server)")
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            exe,
            "--name",
            self.name,
            "--data-dir",
            str(self.root / "data"),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            # Revisions of the registry and the config keys pile up; keep an hour.
            "--auto-compaction-retention",
            "1",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start etcd and wait until it is healthy."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise EtcdError(f"etcd did not become healthy:\n{tail}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers healthy now."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
