"""Why a move stops, each with the exit status of ``imserver migrate-data``."""

from __future__ import annotations


class MoveRefused(Exception):
    """The move cannot start, or its copy differs; ``status`` is the exit status."""

    status = 1


class DatabaseFailed(MoveRefused):
    """A database failed while the move ran (unreachable, a statement refused)."""

    status = 1


class SourceMissing(MoveRefused):
    """``--from`` names no IMServer data directory, or one whose files cannot be read."""

    status = 2


class SourceInUse(MoveRefused):
    """A process (a running server) has a database of the data directory open."""

    status = 3


class TargetNotEmpty(MoveRefused):
    """A table of the target already holds rows (a move copies into empty databases)."""

    status = 4


class CopyDiffers(MoveRefused):
    """The verification found a table whose copy differs from the source."""

    status = 5


class BadTarget(MoveRefused):
    """A copied service's database would not be on a database server."""

    status = 2
