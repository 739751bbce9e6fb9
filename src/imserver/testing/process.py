"""A real ``imserver serve`` process, for the end-to-end tests and the benchmarks.

:class:`ServerProcess` owns a directory: the TOML configuration it writes
(``imserver.toml``), the server's ``data/`` directory, and the server's stdout and
stderr, appended to ``server.stdout.log`` and ``server.stderr.log`` across restarts.
Each start picks two free ports (HTTP and TCP), spawns ``python -m imserver serve``
in a process group of its own and waits until ``GET /readyz`` answers 200. A stop
sends a signal and waits; a server that outlives its timeout is killed with its whole
group. What goes wrong raises :class:`ServerError`, whose message ends with the tails
of both logs.

Picking a port and binding it are two steps, so another process may take the port in
between: a start whose server reports an address "in use" is tried again on other
ports, three tries in all.

Every process started here that still runs when the interpreter exits is killed then,
whatever happened to the code that started it: a server in a process group of its
own does not die with its parent.

The pytest harness (``tests/e2e/conftest.py``) and the benchmark harness
(``benchmarks/harness.py``) are thin layers over this module.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imserver.utils.config import merge_settings

if TYPE_CHECKING:
    from imserver.client import TransportName

HOST: Final = "127.0.0.1"
READY_TIMEOUT: Final = 20.0
"""Seconds a start waits for ``/readyz`` unless told otherwise."""
STOP_TIMEOUT: Final = 15.0
"""Seconds a stop waits for the exit unless told otherwise."""
START_TRIES: Final = 3
LOG_TAIL: Final = 8000
"""Bytes of each log that :meth:`ServerProcess.logs` shows."""
MARKER: Final = "===== "
"""The start of the lines written into the server's logs from outside the server: one
at each start of the process, and those of :meth:`ServerProcess.mark_logs`."""

_live: set[subprocess.Popen[bytes]] = set()
"""Every server process still running, killed at interpreter exit whatever happens."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _live.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        _kill_group(proc)


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct TCP ports free right now on ``host`` (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A small TOML writer for server configuration: scalars, lists and nested tables.

    ``None`` values are left out (TOML has no null), so a mapping can unset a key.
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # JSON string escapes are valid TOML basic strings
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(prefix: str, d: Mapping[str, Any], out: list[str]) -> None:
        subtables: list[tuple[str, Mapping[str, Any]]] = []
        if prefix:
            out.append(f"\n[{prefix}]")
        for k, v in d.items():
            if v is None:
                continue
            if isinstance(v, Mapping):
                subtables.append((k, v))
            else:
                out.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in subtables:
            table(f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k), v, out)

    lines: list[str] = []
    table("", data, lines)
    return "\n".join(lines).lstrip("\n") + "\n"


class ServerError(RuntimeError):
    """The server did not become ready, or did not stop within its timeout."""


class ServerProcess:
    """One ``imserver serve`` process and its directory (config, data, logs).

    :meth:`stop` then :meth:`start` restarts it on the same data directory; the ports
    may change, so read the addresses again after a restart.
    """

    def __init__(
        self,
        root: Path,
        config: Mapping[str, Any] | None = None,
        *,
        host: str = HOST,
        serve_args: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        """``config`` is written to the server's TOML file at each start; ``serve_args``
        are added to every ``imserver serve`` command line."""
        self.root = root
        self.config: dict[str, Any] = dict(config or {})
        self.host = host
        self.serve_args = list(serve_args)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.tcp_port = 0
        self.starts = 0
        """How many processes have been spawned (tries on ports in use included)."""
        self.command: list[str] = []
        """The command line of the latest process."""

    @property
    def data_dir(self) -> Path:
        """The server's ``--data-dir``."""
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        """The server's ``--config`` file."""
        return self.root / "imserver.toml"

    @property
    def stdout_path(self) -> Path:
        """Where the server's stdout is appended."""
        return self.root / "server.stdout.log"

    @property
    def stderr_path(self) -> Path:
        """Where the server's stderr is appended."""
        return self.root / "server.stderr.log"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        """The WebSocket endpoint."""
        return f"ws://{self.host}:{self.http_port}/ws"

    @property
    def tcp_addr(self) -> tuple[str, int]:
        """``(host, port)`` of the TCP listener."""
        return (self.host, self.tcp_port)

    def target(self, transport: TransportName) -> str | tuple[str, int]:
        """What :meth:`imserver.client.Client.connect` takes for ``transport``."""
        return self.ws_url if transport == "ws" else self.tcp_addr

    @property
    def pid(self) -> int:
        """The process id of the latest process."""
        if self.proc is None:
            raise ServerError("server not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the latest process is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "stopped"
        return f"<ServerProcess {self.root.name} {self.http_url} tcp:{self.tcp_port} {state}>"

    def start(
        self, config: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> None:
        """Start the process (merging ``config`` into :attr:`config` first) and wait
        until ``GET /readyz`` answers 200; :class:`ServerError` if it does not within
        ``timeout`` seconds (the ready timeout by default)."""
        if self.running:
            raise RuntimeError("server already running")
        if config:
            self.config = merge_settings(self.config, config)
        timeout = self.ready_timeout if timeout is None else timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_dumps(self.config))
        for attempt in range(START_TRIES):
            self.http_port, self.tcp_port = free_ports(2, self.host)
            self._spawn()
            failure = self._wait_ready(timeout)
            if failure is None:
                return
            # Another process may have taken a port between picking and binding it.
            if attempt < START_TRIES - 1 and "in use" in self._tail(self.stderr_path).lower():
                continue
            raise ServerError(f"imserver did not become ready: {failure}\n{self.logs()}")

    def _spawn(self) -> None:
        self.starts += 1
        self.command = [
            sys.executable,
            "-m",
            "imserver",
            "serve",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--http-port",
            str(self.http_port),
            "--tcp-port",
            str(self.tcp_port),
            *self.serve_args,
        ]
        marker = f"\n{MARKER}start #{self.starts}: {shlex.join(self.command)}\n".encode()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            out.write(marker)
            err.write(marker)
            out.flush()
            err.flush()
            # A process group of its own: a kill reaches anything it spawned, and
            # Ctrl-C in the terminal goes to the parent, not to it.
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=err, env=env, cwd=self.root, start_new_session=True
            )
        _live.add(self.proc)

    def _wait_ready(self, timeout: float) -> str | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = self.http_url + "/readyz"
        last = "no answer"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                _live.discard(self.proc)
                return f"the process exited with code {code}"
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return None
                    last = f"/readyz answered {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"/readyz answered {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        _kill_group(self.proc)
        return f"not ready after {timeout} s ({last})"

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float | None = None) -> int | None:
        """Send ``sig`` and wait for the exit; returns the exit code (None if never
        started).

        A process still alive after ``timeout`` seconds (the stop timeout by default)
        is killed with its group, and :class:`ServerError` raised.
        """
        proc = self.proc
        if proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                name = signal.Signals(sig).name
                raise ServerError(
                    f"imserver ignored {name} for {timeout} s\n{self.logs()}"
                ) from None
        _live.discard(proc)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group at once (a crash); returns the exit code."""
        if self.proc is None:
            return None
        _kill_group(self.proc)
        return self.proc.returncode

    async def astart(self, config: Mapping[str, Any] | None = None) -> None:
        """:meth:`start` without blocking the event loop."""
        await asyncio.to_thread(self.start, config)

    async def astop(
        self,
        sig: int = signal.SIGTERM,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - passed on to stop()
    ) -> int | None:
        """:meth:`stop` without blocking the event loop (clients keep reading meanwhile)."""
        return await asyncio.to_thread(self.stop, sig, timeout=timeout)

    def teardown(self, timeout: float | None = None) -> None:
        """Stop with SIGTERM if possible, kill the group otherwise; never raises."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                _live.discard(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(self.stop_timeout if timeout is None else timeout)
        _kill_group(proc)

    @staticmethod
    def _tail(path: Path, size: int = LOG_TAIL) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - size))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def mark_logs(self, text: str) -> None:
        """Write a :data:`MARKER` line into both logs (the server appends to them too)."""
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                with open(path, "ab") as fh:
                    fh.write(f"{MARKER}{text}\n".encode())

    def logs(self) -> str:
        """The tails of stdout and stderr."""
        return (
            f"--- {self.stdout_path} (tail) ---\n{self._tail(self.stdout_path)}\n"
            f"--- {self.stderr_path} (tail) ---\n{self._tail(self.stderr_path)}"
        )
