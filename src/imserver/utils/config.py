"""Server configuration: defaults, then a TOML file, then ``IMSERVER_*`` variables, then flags.

Each later source overrides the earlier ones. Environment variables name a setting
by its path in upper case, sections joined by a double underscore::

    IMSERVER_HTTP_PORT=9000
    IMSERVER_LIMITS__MAX_FRAME=131072
    IMSERVER_WS__ALLOWED_ORIGINS='["https://chat.example.com"]'

Values from the environment are parsed as TOML values when they parse (numbers,
booleans, arrays), and taken as plain strings otherwise. A string setting takes the
raw text unless it is a quoted TOML string, so ``IMSERVER_SERVER_NAME=2024`` means ``"2024"``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from imserver.utils.errors import BadRequest

ENV_PREFIX = "IMSERVER_"


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Per-connection limits (docs/protocol.md §1)."""

    max_frame: int = 65536
    """Largest frame accepted, in bytes (WebSocket message, TCP payload, HTTP body)."""
    max_body: int = 16384
    """Largest message ``body``, in characters."""
    max_meta: int = 8192
    """Largest ``send.meta``, in bytes of its JSON encoding."""
    rate_per_s: float = 50.0
    """Sustained ops per second per connection (token bucket refill)."""
    rate_burst: int = 200
    """Token bucket size: ops a connection may send at once."""
    heartbeat: int = 30
    """Seconds between client frames; silence for twice this closes the connection."""
    send_queue_bytes: int = 4 * 1024 * 1024
    """Outbound bytes a session may have queued before it is closed as a slow consumer."""
    bad_frames: int = 32
    """Consecutive malformed frames after which a connection is closed."""
    hello_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Seconds a new connection has to send ``hello`` (WebSocket/TCP) or its first request
    head (HTTP port) before it is closed."""
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Most open connections from one client address, both ports together; 0: no cap.
    Behind a load balancer every connection comes from the balancer's address."""
    reserved_fds: Annotated[int, msgspec.Meta(ge=0)] = 256
    """File descriptors kept out of reach of new connections (databases, uploads): the
    listeners stop accepting when fewer than this are left under the process's limit."""


class AuthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    access_ttl: int = 900
    """Access-token lifetime in seconds."""
    refresh_ttl: int = 30 * 86400
    """Refresh-token lifetime in seconds."""
    argon2_memory_kib: int = 19456
    """argon2id memory cost of password hashes (KiB); 19456 is the OWASP minimum."""
    argon2_time_cost: int = 2
    """argon2id iterations of password hashes."""


class WsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """Origins allowed to open the WebSocket; empty allows any (and requests without Origin)."""


class DatabaseConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One service's database (``storage.<service>``); every field empty by default."""

    url: str = ""
    """SQLAlchemy URL of the service's database, e.g. ``postgresql+asyncpg://imserver@db/im``
    or ``mysql+asyncmy://imserver@db/im``; empty: ``storage.url``, and without that the
    SQLite file ``<data_dir>/<service>.db``."""
    read_url: str = ""
    """A replica for the reads that tolerate lag (directory, search, profile look-ups);
    empty: every read goes to ``url``."""
    password_file: str = ""
    """A file holding the password of ``url`` and ``read_url`` (its content, stripped of
    surrounding whitespace); empty: ``storage.password_file``, else the URL's own."""


class StorageConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where each service keeps its data, and the message writer's group commit.

    A URL with a password is best given through the environment
    (``IMSERVER_STORAGE__URL``) or with the password in ``password_file``, not on a
    command line, where other users of the machine can read it.
    """

    batch_max: int = 512
    """Most messages committed in one group-commit transaction."""
    url: str = ""
    """Database URL of every service without a ``storage.<service>.url`` of its own;
    empty: one SQLite file per service under ``data_dir``. Services may share one
    database: their tables and migration version tables have distinct names."""
    password_file: str = ""
    """A file holding the password of ``url`` (and of the services' URLs without a
    ``password_file`` of their own)."""
    user: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    message: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    room: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    file: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    notification: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)


class RoomsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_size: Annotated[int, msgspec.Meta(ge=1)] = 10000
    """Most members a room may have; a join or create past it answers ``forbidden``."""


class FilesConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The file service (docs/protocol.md §6): limits, blob backend, clean-up of orphans."""

    max_size: Annotated[int, msgspec.Meta(ge=0)] = 20 * 1024 * 1024
    """Largest upload in bytes, enforced on the bytes received (``too_large``)."""
    quota_per_user: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024 * 1024
    """Bytes of uploads a user may have stored (every upload counts); 0: no quota."""
    backend: Literal["local", "s3"] = "local"
    """Where blobs live: ``local`` (``<data_dir>/files``) or ``s3`` (any S3 API endpoint)."""
    s3_endpoint: str = ""
    """S3 API endpoint URL, e.g. ``http://minio:9000``; empty: AWS's default endpoint."""
    s3_bucket: str = "imserver-files"
    """Bucket of the blobs (created at start if missing)."""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    """Empty: boto3's default credential chain (environment, profile, instance role)."""
    s3_secret_key: str = ""
    s3_prefix: str = ""
    """Prepended to every object key, e.g. ``imserver/``."""
    orphan_grace: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    """Seconds an upload may stay unreferenced by any message before clean-up deletes it."""
    cleanup_interval: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """Seconds between clean-up runs."""


class WebhookConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``webhook`` push provider: a signed JSON POST to the operator's receiver."""

    url: str = ""
    """Where every webhook push is POSTed; empty: the provider is off."""
    secret: str = ""
    """The HMAC-SHA256 key of the signature header."""
    secret_file: str = ""
    """A file holding the key instead (its content, stripped of surrounding whitespace)."""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Seconds for one request, connection included."""


class WebPushConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``webpush`` provider (RFC 8030, payloads per RFC 8291, VAPID per RFC 8292)."""

    enabled: bool = True
    subject: str = "mailto:admin@localhost"
    """The VAPID ``sub`` claim: a ``mailto:`` or ``https:`` contact of the operator."""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    ttl: Annotated[int, msgspec.Meta(ge=0)] = 86400
    """Seconds a push service keeps an undelivered push (the ``TTL`` header)."""


class FcmConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``fcm`` provider (FCM HTTP v1, OAuth2 with a service account)."""

    service_account_file: str = ""
    """The service account's JSON key file; empty: the provider is off."""
    project_id: str = ""
    """Empty: the ``project_id`` of the service account file."""
    endpoint: str = "https://fcm.googleapis.com"
    token_url: str = ""
    """Where the signed JWT is exchanged for an access token; empty: the file's ``token_uri``."""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class ApnsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``apns`` provider (HTTP/2, token-based authentication with a .p8 key)."""

    key_file: str = ""
    """The ES256 signing key (``AuthKey_<key id>.p8``); empty: the provider is off."""
    key_id: str = ""
    team_id: str = ""
    topic: str = ""
    """The app's bundle id (the ``apns-topic`` header)."""
    endpoint: str = "https://api.push.apple.com"
    """``https://api.sandbox.push.apple.com`` for development builds."""
    ca_file: str = ""
    """PEM certificates to verify the endpoint with instead of the system's (a local
    APNs stand-in); empty: the system's."""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class PushConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The notification service: its queue and its providers."""

    collapse_delay: Annotated[float, msgspec.Meta(ge=0)] = 0.25
    """Seconds a new push waits for more messages of the same conversation and device
    to fold into it (a burst becomes one push with a count)."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 8
    """Attempts of one push before it is dead-lettered."""
    backoff_base: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """Seconds before the first retry; doubled each attempt, with full jitter."""
    backoff_max: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    queue_max: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """Pushes waiting per provider; past it the oldest waiting push of that provider is
    dropped (recorded as ``dropped`` in its trace)."""
    concurrency: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Requests in flight per provider. A push's round trip includes its turn on the
    event loop, so at 1,000 pushes/s a few hundred are in flight (docs/performance.md)."""
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    webpush: WebPushConfig = msgspec.field(default_factory=WebPushConfig)
    fcm: FcmConfig = msgspec.field(default_factory=FcmConfig)
    apns: ApnsConfig = msgspec.field(default_factory=ApnsConfig)


class EtcdConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """etcd: the config centre (and, in the distributed mode, service discovery).

    With no ``endpoints`` the server uses no etcd: every setting comes from the
    configuration. The breaker settings govern the circuit breaker each client keeps
    per instance of a service it calls (docs/operations.md, "Discovery").
    """

    endpoints: list[str] = msgspec.field(default_factory=list)
    """Client URLs of the etcd members, e.g. ``["http://10.0.0.5:2379"]``; a request
    goes to the first that answers."""
    prefix: str = "/imserver"
    """The key prefix of this deployment: ``<prefix>/services/...`` (the registry) and
    ``<prefix>/config/...`` (the dynamic settings)."""
    lease_ttl: Annotated[int, msgspec.Meta(ge=2, le=60)] = 10
    """Seconds an instance's registration outlives its last keep-alive (it is renewed
    every third of it): a crashed instance leaves the registry within this time."""
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] = 3.0
    """Seconds one request to etcd may take before the member counts as unreachable."""
    retry_max: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Longest pause, in seconds, between attempts to reach etcd while it is down
    (the pauses double from 0.1 s up to this)."""
    breaker_failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Consecutive failed calls after which an instance's breaker opens."""
    breaker_cooldown: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Seconds an open breaker refuses calls before it lets probes through."""
    breaker_probes: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Calls a half-open breaker lets through; all must succeed to close it."""


_Delays = Annotated[list[Annotated[float, msgspec.Meta(gt=0)]], msgspec.Meta(min_length=1)]


class EventsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The durable event stream (``message.stored``, room membership changes, file
    events): off by default, where the notification service takes the message
    writer's commits by a direct call."""

    backend: Literal["none", "rabbitmq"] = "none"
    """``none``: no event stream. ``rabbitmq``: the message, room and file services
    write their events into an outbox table in the transaction of each change, a
    relay publishes them to RabbitMQ, and the notification service consumes
    ``message.stored`` from its own queue."""
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """The broker's AMQP URL (a vhost is its path: ``amqp://user:pass@host/vhost``)."""
    prefix: str = "imserver"
    """Prefix of the exchange (``<prefix>.events``) and of every queue."""
    prefetch: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Unacknowledged events a consumer holds at once."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Deliveries of one event to a consumer group before it is dead-lettered
    (``<prefix>.<group>.dead``)."""
    backoff: Annotated[list[Annotated[float, msgspec.Meta(gt=0)]], msgspec.Meta(min_length=1)] = (
        msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0])
    )
    """Seconds before each retry of a failed event (the last repeats); one delay queue
    per entry."""


class RedisConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The Redis of several processes (``live = "redis"``): the live bus between
    gateways, presence and the online-session routing table."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "imserver:"
    """Put before every channel and key: several clusters can share one Redis."""
    heartbeat: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Seconds between an instance's refreshes of its presence entries (and between
    the keep-alive pings of the bus's subscriber connection)."""
    ttl: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    """Seconds an instance's presence entries outlive its last refresh: the users of
    a process that died are offline within this time."""

    def __post_init__(self) -> None:
        if self.heartbeat >= self.ttl:
            raise ValueError("redis.heartbeat must be below redis.ttl")


class RpcConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Calls between services over gRPC (the distributed mode): deadlines and retries."""

    deadline: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Seconds a unary call may take, each attempt, before it fails ``unavailable``."""
    stream_deadline: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """Seconds a server-streaming call (a download's bytes) may take in all."""
    upload_deadline: Annotated[float, msgspec.Meta(gt=0)] = 900.0
    """Seconds a client-streaming call (an upload) may take in all."""
    retry_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    """Attempts of an idempotent call that fails in transport (1: no retry)."""
    retry_backoff: Annotated[float, msgspec.Meta(gt=0)] = 0.05
    """Seconds of the first retry's backoff ceiling; it doubles per attempt."""
    retry_backoff_max: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """Seconds the backoff ceiling never exceeds."""
    host: str = ""
    """Address the process's gRPC server listens on (empty: the ``host`` setting)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """Port of the gRPC server (0: a free one; ``imserver serve --rpc-port``)."""
    advertise: str = ""
    """``host:port`` other processes call, written in the registry (empty: the
    listening address, or this machine's name when that is a wildcard)."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting of ``imserver serve``."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    tcp_port: int = 8090
    listen_backlog: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Connections the kernel queues on each port before they are accepted; 0: the
    system's maximum (``net.core.somaxconn``)."""
    data_dir: str = "./data"
    log_level: str = "info"
    server_name: str = "imserver"
    admins: list[str] = msgspec.field(default_factory=list)
    """Usernames allowed to use admin ops such as ``notice.broadcast``."""
    shutdown_grace: float = 5.0
    """Seconds to wait for queued frames to flush on shutdown."""
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    ws: WsConfig = msgspec.field(default_factory=WsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    rooms: RoomsConfig = msgspec.field(default_factory=RoomsConfig)
    files: FilesConfig = msgspec.field(default_factory=FilesConfig)
    push: PushConfig = msgspec.field(default_factory=PushConfig)
    etcd: EtcdConfig = msgspec.field(default_factory=EtcdConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)

    live: Literal["memory", "redis"] = "memory"
    """Where the live bus, presence and the online-session routing table live:
    ``memory`` (one process) or ``redis`` (the ``[redis]`` settings; several
    processes on one database)."""
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    rpc: RpcConfig = msgspec.field(default_factory=RpcConfig)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def setting_type(path: list[str]) -> Any:
    """The declared type of the setting at ``path``, or None when there is no such setting."""
    typ: Any = Config
    for part in path:
        if not (isinstance(typ, type) and issubclass(typ, msgspec.Struct)):
            return None
        by_name = {f.name: f.type for f in msgspec.structs.fields(typ)}
        if part not in by_name:
            return None
        typ = by_name[part]
    return typ


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadRequest(f"invalid configuration: {key} sets inside a plain value")
        if isinstance(node.get(path[-1]), dict):
            raise BadRequest(f"invalid configuration: {key} replaces a whole section")
        value = _parse_env_value(raw)
        # TOML parsing turns "2024" or "true" into a number or a boolean, which a string
        # setting would then reject: there, anything but a TOML string is the raw text.
        if not isinstance(value, str) and setting_type(path) is str:
            value = raw
        node[path[-1]] = value
    return tree


def merge_settings(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, section by section (neither is modified)."""
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = merge_settings(current, value)
        else:
            out[key] = value
    return out


def load_config(
    file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML ``file`` < environment < ``overrides``.

    ``file`` defaults to ``$IMSERVER_CONFIG`` when set. Unknown keys and wrong types
    raise :class:`BadRequest` naming the setting.
    """
    env = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    path = file if file is not None else env.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            tree = tomllib.load(fh)
    tree = merge_settings(tree, _env_overrides(env))
    tree = merge_settings(tree, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid configuration: {exc}") from None
