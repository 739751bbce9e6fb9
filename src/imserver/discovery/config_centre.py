"""The config centre: dynamic settings stored in etcd and applied at run time.

Each dynamic setting (the catalogue is :data:`imserver.utils.live.DYNAMIC`) lives at
``<prefix>/config/<name>`` as a JSON value, e.g. ``/imserver/config/rooms.max_size``
→ ``500``. Every instance watches ``<prefix>/config/`` (a
:class:`~imserver.discovery.watch.PrefixWatch`) and puts each value in force in its
:class:`~imserver.utils.live.LiveSettings`, which the services read per request:
a change applies from the next request on, without a restart. A deleted key gives
the setting back its value from the configuration.

Every change applied is logged with its etcd revision (the key's ``mod_revision``),
and the newest is the gauge ``imserver_config_revision``. A key with an unknown name
or an ill-typed value (written around ``imserver config set``, which refuses both) is
ignored with a warning, once per revision, and counted as ``ignored``.

At start the first read is done before the server takes requests when etcd answers
within ``[etcd] request_timeout``: a value set while the instance was down is in force
from its first request. When etcd is down the server starts on its configured values
and the watch applies the stored ones once etcd answers.

:func:`get_setting`, :func:`set_setting` and :func:`list_settings` are the
``imserver config`` command's side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from imserver.discovery.etcd import Entry, EtcdClient
from imserver.discovery.watch import PrefixWatch
from imserver.utils.errors import BadRequest
from imserver.utils.live import DYNAMIC, LiveSettings, check_name, decode_value, parse_value
from imserver.utils.metrics import DiscoveryMetrics

logger = logging.getLogger(__name__)


def config_prefix(prefix: str) -> str:
    """The key prefix of the dynamic settings (ending with ``/``)."""
    return f"{prefix.rstrip('/')}/config/"


class ConfigCentre:
    """Applies the dynamic settings stored in etcd to ``live`` (see the module docstring)."""

    def __init__(
        self,
        client: EtcdClient,
        live: LiveSettings,
        *,
        prefix: str,
        metrics: DiscoveryMetrics | None = None,
        retry_max: float = 5.0,
    ) -> None:
        self.live = live
        self.prefix = config_prefix(prefix)
        self._metrics = metrics
        self._seen: dict[str, int] = {}
        """The revision of each setting's key last looked at (applied or ignored)."""
        self.watch = PrefixWatch(client, self.prefix, self._update, retry_max=retry_max)

    def start(self) -> None:
        """Start watching."""
        self.watch.start()

    async def wait_synced(self, within: float | None = None) -> bool:
        """Wait for the first read; False when ``within`` seconds ran out."""
        return await self.watch.wait_synced(within)

    async def stop(self) -> None:
        """Stop watching; the settings in force stay."""
        await self.watch.stop()

    def _count(self, name: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.config_changes[(name, result)] += 1

    def _update(self, entries: dict[str, Entry], revision: int) -> None:
        present: set[str] = set()
        for key, entry in entries.items():
            name = key[len(self.prefix) :]
            present.add(name)
            if self._seen.get(name) == entry.mod_revision:
                continue
            self._seen[name] = entry.mod_revision
            try:
                value = decode_value(name, entry.value)
            except BadRequest as exc:
                logger.warning(
                    "config: ignoring %s at revision %d: %s", key, entry.mod_revision, exc
                )
                self._count(name, "ignored")
                continue
            self._apply(name, value, entry.mod_revision)
        for name in [n for n in self._seen if n not in present]:
            del self._seen[name]
            if name in DYNAMIC:
                # A deletion's revision is the mirror's: the key has no revision left.
                self._apply(name, None, revision)

    def _apply(self, name: str, value: Any, revision: int) -> None:
        changed = self.live.apply(name, value)
        shown = "its configured value" if value is None else repr(value)
        logger.info(
            "config: %s = %s at revision %d%s",
            name,
            shown if value is not None else f"{self.live.value(name)!r} ({shown})",
            revision,
            "" if changed else " (unchanged)",
        )
        self._count(name, "applied")
        self.live.revision = max(self.live.revision, revision)
        if self._metrics is not None:
            self._metrics.config_revision = self.live.revision


@dataclass(frozen=True)
class StoredSetting:
    """A dynamic setting as stored in etcd: its value, or None when not set there."""

    name: str
    value: Any
    revision: int
    """The key's ``mod_revision`` (0 when not set)."""


def parse_cli_value(name: str, text: str) -> Any:
    """A value typed on the command line: JSON when it parses (``3``, ``2.5``,
    ``"x"``), else the text as a string (``debug``); checked for ``name``."""
    try:
        value = msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        value = text
    return parse_value(name, value)


def _stored_value(entry: Entry) -> Any:
    """A stored value decoded; the raw text when it is not JSON (written around the
    command, and ignored by the servers)."""
    try:
        return msgspec.json.decode(entry.value)
    except msgspec.DecodeError:
        return entry.value.decode(errors="replace")


async def set_setting(client: EtcdClient, prefix: str, name: str, text: str) -> tuple[Any, int]:
    """Check ``text`` for ``name`` and store it; the value and the revision written.
    :class:`BadRequest` for a static or unknown name or an ill-typed value."""
    value = parse_cli_value(name, text)
    revision = await client.put(config_prefix(prefix) + name, msgspec.json.encode(value))
    return value, revision


async def get_setting(client: EtcdClient, prefix: str, name: str) -> tuple[StoredSetting, int]:
    """The stored setting ``name`` and the store's revision."""
    check_name(name)
    entry, revision = await client.get(config_prefix(prefix) + name)
    if entry is None:
        return StoredSetting(name, None, 0), revision
    return StoredSetting(name, _stored_value(entry), entry.mod_revision), revision


async def list_settings(client: EtcdClient, prefix: str) -> tuple[list[StoredSetting], int]:
    """Every dynamic setting (stored or not, in catalogue order) and the store's revision."""
    base = config_prefix(prefix)
    entries, revision = await client.get_prefix(base)
    stored = {e.key[len(base) :]: e for e in entries}
    out = []
    for name in DYNAMIC:
        entry = stored.get(name)
        if entry is None:
            out.append(StoredSetting(name, None, 0))
        else:
            out.append(StoredSetting(name, _stored_value(entry), entry.mod_revision))
    return out, revision
