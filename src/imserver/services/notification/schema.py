"""The notification service's tables (``notification.db``) and the one row type the
store and the ingest both read (:func:`registration_from_row`); the migration
the migrations (``notification_0001`` and on) create them and a test compares the two.

- ``registrations`` — one row per (user, device, provider): where pushes for that
  device go. A device is a login session.
- ``conv_settings`` — a user's mute and level for one conversation (no row: not
  muted, level ``all``).
- ``push_jobs`` — the outbox: one row per push, keyed by its idempotency key and
  kind. ``state`` moves ``queued`` → ``sending`` → ``sent``, or through
  ``retry-wait`` back to ``sending``, and ends ``sent``, ``dead`` (attempts used up),
  ``dropped`` (the provider's queue overflowed), ``gone`` (the registration no
  longer exists at the provider) or ``failed`` (refused for good, or unregistered
  meanwhile). ``next_at`` is when a waiting job is due.
- ``push_attempts`` — every attempt of a job with the provider's answer.
- ``push_decisions`` — per (conv, seq, member) why a push was or was not due; only
  for the sender and the members who may have a registration (the trace answers
  ``no_registration`` for the others).
- ``push_cursor`` — named counters: the newest message timestamp ingested.

Rows are bounded: the worker deletes finished jobs (and their attempts) and
decisions older than the retention (``RETENTION_MS``).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from imserver.services.notification.providers.base import Registration

metadata = MetaData()

USER_LEN = 64
DEVICE_LEN = 64
CONV_LEN = 200
KEY_LEN = 400

ROW_ID = BigInteger().with_variant(Integer(), "sqlite")

registrations = Table(
    "registrations",
    metadata,
    Column("user_id", String(USER_LEN), nullable=False),
    Column("device", String(DEVICE_LEN), nullable=False),
    Column("provider", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", "device", "provider", name="pk_registrations"),
    Index("ix_registrations_device", "device"),
)

conv_settings = Table(
    "conv_settings",
    metadata,
    Column("user_id", String(USER_LEN), nullable=False),
    Column("conv", String(CONV_LEN), nullable=False),
    Column("muted_until", BigInteger, nullable=False),
    Column("level", String(8), nullable=False),
    PrimaryKeyConstraint("user_id", "conv", name="pk_conv_settings"),
    Index("ix_conv_settings_conv", "conv"),
)

push_jobs = Table(
    "push_jobs",
    metadata,
    Column("id", ROW_ID, primary_key=True, autoincrement=True),
    Column("key", String(KEY_LEN), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("user_id", String(USER_LEN), nullable=False),
    Column("device", String(DEVICE_LEN), nullable=False),
    Column("provider", String(16), nullable=False),
    Column("conv", String(CONV_LEN), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
    Column("title", String(200), nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(12), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_at", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Index("uq_push_jobs_kind_key", "kind", "key", unique=True),
    Index("ix_push_jobs_state_next", "state", "next_at"),
    Index("ix_push_jobs_provider_state", "provider", "state"),
    Index("ix_push_jobs_waiting", "kind", "state", "user_id", "device", "conv"),
)

push_attempts = Table(
    "push_attempts",
    metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("n", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("status", String(8), nullable=False),
    Column("code", Integer, nullable=True),
    Column("detail", Text, nullable=False),
    PrimaryKeyConstraint("job_id", "n", name="pk_push_attempts"),
)

push_decisions = Table(
    "push_decisions",
    metadata,
    Column("conv", String(CONV_LEN), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("user_id", String(USER_LEN), nullable=False),
    Column("due", Boolean, nullable=False),
    Column("reason", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    PrimaryKeyConstraint("conv", "seq", "user_id", name="pk_push_decisions"),
    Index("ix_push_decisions_created", "created"),
)

push_cursor = Table(
    "push_cursor",
    metadata,
    Column("name", String(32), nullable=False),
    Column("value", BigInteger, nullable=False),
    PrimaryKeyConstraint("name", name="pk_push_cursor"),
)

QUEUED: Final = "queued"
SENDING: Final = "sending"
SENT: Final = "sent"
RETRY_WAIT: Final = "retry-wait"
DEAD: Final = "dead"
DROPPED: Final = "dropped"
GONE: Final = "gone"
FAILED: Final = "failed"

WAITING: Final = (QUEUED, RETRY_WAIT)
"""States of a job that the worker will still send (and that absorbs later messages)."""
FINISHED: Final = (SENT, DEAD, DROPPED, GONE, FAILED)

RETENTION_MS: Final = 7 * 24 * 3600 * 1000
"""Finished jobs, their attempts and decisions older than this are deleted."""


def registration_from_row(row: Any) -> Registration:
    """A ``registrations`` row as the providers take it (``target`` is stored as JSON)."""
    return Registration(
        user=row.user_id,
        device=row.device,
        provider=row.provider,
        target=msgspec.json.decode(row.target),
        created=row.created,
    )
