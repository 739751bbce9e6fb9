"""The etcd of the tests: :class:`imserver.cluster.etcd.EtcdServer`, whose processes
are also killed when the test process exits, whatever the test did."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess

from imserver.cluster import etcd
from imserver.cluster.etcd import EtcdError, EtcdMissing, etcd_binary

__all__ = ["EtcdError", "EtcdMissing", "EtcdServer", "etcd_binary"]

_live: set[subprocess.Popen[bytes]] = set()


class EtcdServer(etcd.EtcdServer):
    """An etcd member that cannot outlive the test process."""

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        _live.add(proc)

    def _ended(self, proc: subprocess.Popen[bytes]) -> None:
        _live.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
