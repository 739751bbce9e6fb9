"""Dynamic settings: the values a running server reads per request and the config
centre may change without a restart (docs/operations.md, "The config centre").

Each dynamic setting is named by its path in the TOML configuration
(``rooms.max_size``) and starts at the value the configuration gives it. A service
keeps the :class:`Live` cell of each setting it reads and reads ``cell.value`` when a
request needs it, so a change applies from the next request on. The cells of one
process are held by one :class:`LiveSettings`, built from the configuration by the
composition root and changed only through :meth:`LiveSettings.apply`.

:data:`DYNAMIC` is the catalogue: the names that may change at run time, each with
its type (and bounds). Every other setting (ports, URLs, directories, ...) is static:
it stays in the TOML file and the environment. :func:`parse_value` is the single
check of a new value, used by ``imserver config set`` (which refuses a bad one) and
by the watchers (which ignore it with a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

import msgspec

from imserver.utils.config import Config, setting_type
from imserver.utils.errors import BadRequest

T = TypeVar("T")

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Live(Generic[T]):
    """One dynamic setting's current value; read ``value`` per request."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Live({self.value!r})"


def cell(value: T | Live[T]) -> Live[T]:
    """``value`` itself when it is a cell, else a fixed cell holding it (a service
    built without live settings, as in the tests, reads its constructor's value)."""
    return value if isinstance(value, Live) else Live(value)


@dataclass(frozen=True)
class Dynamic:
    """One entry of the catalogue: a setting that may change at run time."""

    name: str
    """Its path in the TOML configuration, also its key under ``<prefix>/config/``."""
    type: Any
    """What :func:`msgspec.convert` checks a new value against."""
    doc: str


DYNAMIC: dict[str, Dynamic] = {
    d.name: d
    for d in (
        Dynamic("log_level", LogLevel, "the level of the server's log"),
        Dynamic(
            "limits.rate_per_s",
            Annotated[float, msgspec.Meta(gt=0)],
            "ops per second per connection (token bucket refill)",
        ),
        Dynamic(
            "limits.rate_burst",
            Annotated[int, msgspec.Meta(ge=1)],
            "token bucket size: ops a connection may send at once",
        ),
        Dynamic(
            "rooms.max_size",
            Annotated[int, msgspec.Meta(ge=1)],
            "most members a room may have (a join or create past it: forbidden)",
        ),
        Dynamic(
            "files.max_size",
            Annotated[int, msgspec.Meta(ge=0)],
            "largest upload in bytes (too_large)",
        ),
        Dynamic(
            "files.quota_per_user",
            Annotated[int, msgspec.Meta(ge=0)],
            "bytes of uploads a user may have stored; 0: no quota",
        ),
    )
}
"""The dynamic settings, by name."""


def check_name(name: str) -> Dynamic:
    """The catalogue entry of ``name``; :class:`BadRequest` for a static or unknown name."""
    entry = DYNAMIC.get(name)
    if entry is not None:
        return entry
    if setting_type(name.split(".")) is not None:
        raise BadRequest(
            f"{name} is a static setting: set it in the TOML file or the environment "
            "and restart (dynamic settings: " + ", ".join(DYNAMIC) + ")"
        )
    raise BadRequest(f"unknown setting {name!r} (dynamic settings: {', '.join(DYNAMIC)})")


def parse_value(name: str, value: Any) -> Any:
    """``value`` (decoded JSON) checked and converted for the setting ``name``;
    :class:`BadRequest` naming the setting when the name or the value is refused."""
    entry = check_name(name)
    try:
        return msgspec.convert(value, entry.type, strict=True)
    except msgspec.ValidationError as exc:
        choices = get_args(entry.type) if get_origin(entry.type) is Literal else ()
        hint = f" (one of: {', '.join(map(str, choices))})" if choices else ""
        raise BadRequest(f"invalid value {value!r} for {name}: {exc}{hint}") from None


def decode_value(name: str, raw: bytes) -> Any:
    """A stored value (JSON bytes) checked for ``name`` (see :func:`parse_value`)."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise BadRequest(f"the value of {name} is not JSON: {raw[:80]!r}") from None
    return parse_value(name, value)


def static_value(config: Config, name: str) -> Any:
    """The value the configuration (TOML, environment) gives the setting ``name``."""
    node: Any = config
    for part in name.split("."):
        node = getattr(node, part)
    return node


class LiveSettings:
    """The dynamic settings in force in this process: one :class:`Live` cell each.

    ``revision`` is the etcd revision of the newest change applied (0: none).
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.cells: dict[str, Live[Any]] = {
            name: Live(static_value(config, name)) for name in DYNAMIC
        }
        self.revision = 0

    @property
    def rate_per_s(self) -> Live[float]:
        return self.cells["limits.rate_per_s"]

    @property
    def rate_burst(self) -> Live[int]:
        return self.cells["limits.rate_burst"]

    @property
    def room_max_size(self) -> Live[int]:
        return self.cells["rooms.max_size"]

    @property
    def upload_max_size(self) -> Live[int]:
        return self.cells["files.max_size"]

    @property
    def upload_quota(self) -> Live[int]:
        return self.cells["files.quota_per_user"]

    def value(self, name: str) -> Any:
        """The value of ``name`` in force."""
        return self.cells[check_name(name).name].value

    def apply(self, name: str, value: Any) -> bool:
        """Put a checked ``value`` (from :func:`parse_value`) in force for ``name``;
        ``None`` restores the configuration's value. Returns whether it changed."""
        entry = check_name(name)
        if value is None:
            value = static_value(self._config, entry.name)
        live = self.cells[entry.name]
        if live.value == value:
            return False
        live.value = value
        if entry.name == "log_level":
            # The root logger's level, which the command line set at start.
            logging.getLogger().setLevel(str(value).upper())
        return True
