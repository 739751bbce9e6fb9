"""A RabbitMQ node of one's own, for tests that stop the broker.

The tests share the machine's broker (``127.0.0.1:5672``) with other runs, each under a
prefix of its own; a test that stops and restarts the broker must not take it from the
others, so it starts a :class:`RabbitServer` instead: Debian's ``rabbitmq-server`` as
a second node on the same machine, with a node name, AMQP and distribution ports, a
data directory and a ``HOME`` (for its Erlang cookie) of its own, and no plugins. It
registers with the machine's ``epmd`` like any node. Stopping it and starting it again
keeps its data directory, so durable queues and the messages in them survive, as on
a real broker's restart.

:func:`delete_topology` removes what a test or a benchmark declared under its prefix
on any broker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from imserver.testing.process import free_ports

SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
"""Debian's start script (``/usr/sbin/rabbitmq-server`` switches to the rabbitmq user
and reads the machine's node name)."""


def binary() -> str | None:
    """The node's start script, or None when RabbitMQ is not installed."""
    return SCRIPT if os.access(SCRIPT, os.X_OK) else None


class RabbitServer:
    """A private RabbitMQ node on free ports that can be stopped and started again."""

    def __init__(self) -> None:
        script = binary()
        if script is None:
            raise FileNotFoundError(
                "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
            )
        self.script = script
        self.port, self.dist_port = free_ports(2)
        self.dir = Path(tempfile.mkdtemp(prefix="imserver-rabbitmq-"))
        self.node = f"imstest{secrets.token_hex(4)}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "home").mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            HOME=str(self.dir / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
            RABBITMQ_PID_FILE=str(self.dir / "node.pid"),
        )

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        with open(self.dir / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.script],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = (self.dir / "node.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rabbitmq-server did not start:\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node gracefully (SIGTERM, as a service manager does), keeping its data."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def kill(self) -> None:
        """``kill -9`` the node and every process of its session."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        """Kill the node and remove its directory."""
        self.kill()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


async def delete_topology(
    url: str, prefix: str, groups: Iterable[str], backoff: Sequence[float]
) -> None:
    """Delete the exchange under ``prefix`` on the broker at ``url``, and each of
    ``groups``' queues (its queue, its dead-letter queue and a retry queue per
    ``backoff`` step); what is already gone is passed over."""
    import aio_pika

    from imserver.storage.events_rabbitmq import Topology

    topology = Topology(prefix, backoff)
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        for group in groups:
            for name in (
                topology.queue(group),
                topology.dead_queue(group),
                *(topology.retry_queue(group, s) for s in range(1, len(backoff) + 1)),
            ):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(topology.exchange)
