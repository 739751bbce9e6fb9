"""A real etcd server on free ports: the local cluster's (``imserver cluster``), and
through :mod:`imserver.testing.etcd` the tests'.

:class:`EtcdServer` owns a directory: the member's data (``data/``) and its log
(``etcd.log``, appended across restarts). :meth:`EtcdServer.start` picks two free
ports (client and peer), runs ``etcd`` in a process group of its own and waits until
``/health`` answers ``true``; :meth:`EtcdServer.stop` ends it (SIGTERM, then SIGKILL
after a timeout). A stopped server starts again on the same ports and the same data,
which is how a test takes etcd away and brings it back.

The binary comes from Debian's ``etcd-server`` package. :func:`etcd_binary` finds it
on the ``PATH`` or in ``/usr/bin``, and installs the package with ``apt-get`` when it
is missing and the process may (root); it raises :class:`EtcdMissing` with the reason
otherwise. Whether that is a skip or a failure is the caller's choice (the tests fail
under ``CI=true``, see ``tests/etcd_server.py``).

Debian's package starts a system service on the default ports (2379/2380) where an
init system runs; the tests never use it, and :func:`etcd_binary` stops it when its
own installation started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from imserver.cluster.ports import free_ports

HOST: Final = "127.0.0.1"

START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
PACKAGE: Final = "etcd-server"


class EtcdMissing(RuntimeError):
    """No etcd binary, and it cannot be installed here; the message says why."""


class EtcdError(RuntimeError):
    """etcd did not start or stop as asked; the message ends with its log's tail."""


def _find() -> str | None:
    found = shutil.which("etcd")
    if found is None and os.access("/usr/bin/etcd", os.X_OK):
        found = "/usr/bin/etcd"
    return found


def etcd_binary() -> str:
    """The path of the ``etcd`` binary, installing Debian's ``etcd-server`` when it is
    missing and this process may; :class:`EtcdMissing` with the reason otherwise."""
    found = _find()
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        raise EtcdMissing(f"etcd is not installed and there is no apt-get to install {PACKAGE}")
    if os.geteuid() != 0:
        raise EtcdMissing(f"etcd is not installed; install it with `apt-get install {PACKAGE}`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", PACKAGE])
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 and step[1] == "install":
            raise EtcdMissing(f"`{' '.join(step)}` failed: {done.stderr.strip()[-500:]}")
    # The package's own service may have started on 2379; nothing here uses it.
    if shutil.which("systemctl") is not None:
        subprocess.run(["systemctl", "stop", "etcd"], capture_output=True, check=False)
    found = _find()
    if found is None:
        raise EtcdMissing(f"{PACKAGE} was installed but no etcd binary was found")
    return found


class EtcdServer:
    """One etcd member in a directory of its own (see the module docstring)."""

    def __init__(self, root: Path, *, host: str = HOST) -> None:
        self.root = root
        self.host = host
        self.client_port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, ``http://host:port``."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "etcd.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start etcd (on new free ports the first time, the same ports after) and wait
        until it is healthy; :class:`EtcdError` if it is not within ``timeout`` s."""
        if self.running:
            raise RuntimeError("etcd already running")
        binary = etcd_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.client_port:
            self.client_port, self.peer_port = free_ports(2, self.host)
        peer = f"http://{self.host}:{self.peer_port}"
        command = [
            binary,
            "--name",
            "default",
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
            f"default={peer}",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=log, cwd=self.root, start_new_session=True
            )
        self._started(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdError(f"etcd exited with code {self.proc.returncode}\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise EtcdError(f"etcd not healthy after {timeout} s\n{self.tail()}")

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers ``"health":"true"``."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait; killed with its group after ``timeout`` seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._ended(proc)

    def kill(self) -> None:
        """SIGKILL etcd's process group at once."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._ended(proc)

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.running and self.proc is not None else None

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        """A hook: the process ``proc`` was spawned."""

    def _ended(self, proc: subprocess.Popen[bytes]) -> None:
        """A hook: the process ``proc`` was stopped or killed."""

    def tail(self, size: int = 4000) -> str:
        """The end of etcd's log."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no etcd log)"
        return data[-size:].decode(errors="replace")
