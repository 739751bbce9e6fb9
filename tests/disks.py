"""A real full disk for tests: a small tmpfs mounted for one test, filled to its last
byte on demand and given back.

SQLite's ``max_page_count`` is no stand-in: a write that fits in the free room of a
page already allocated never grows the database, so most small writes would still
succeed. On a full file system every WAL append fails, which is what a server meets.

Mounting needs root (``CAP_SYS_ADMIN``). Where the mount is refused, tests that need
a full disk are skipped with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SIZE = 32 * 1024 * 1024
"""Bytes of a test's tmpfs: room for the databases and a few uploads."""


class SmallDisk:
    """A mounted tmpfs at ``path``; :meth:`fill` takes every free byte, :meth:`free`
    gives them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ballast = path / ".ballast"

    @property
    def full(self) -> bool:
        return self._ballast.exists()

    def fill(self) -> None:
        """Write a ballast file until the file system refuses a single byte."""
        fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = 1024 * 1024
            while block:
                try:
                    os.write(fd, b"\0" * block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    block //= 2
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0, "the tmpfs still has free blocks"

    def free(self) -> None:
        """Delete the ballast: the space is back."""
        self._ballast.unlink()


def _refuse(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"a full-disk test cannot run under CI=true: {reason}")
    pytest.skip(f"full-disk test skipped: {reason}")


@contextlib.contextmanager
def small_disk(path: Path, size: int = SIZE) -> Iterator[SmallDisk]:
    """Mount a ``size``-byte tmpfs at ``path`` (created if needed) for the block.

    Everything that holds a file open on it must be closed before the block ends;
    the unmount falls back to a lazy one so a leak cannot wedge the next test.
    """
    if os.geteuid() != 0:
        _refuse("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        _refuse(f"mount -t tmpfs failed: {mount.stderr.strip() or mount.returncode}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
