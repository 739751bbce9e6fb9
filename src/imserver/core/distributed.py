"""The composition root of the distributed mode: some services here, the others over gRPC.

``imserver serve --services user,room`` runs the services it names in this process
and reaches every other one as a gRPC client (:func:`imserver.rpc.client.grpc_client`)
over a :class:`~imserver.discovery.balancer.ServiceUpstream`: the instances of that
service registered in etcd, balanced round robin, each behind its circuit breaker.

* The local services are built exactly as :func:`~imserver.core.embedded.build_embedded`
  builds them, on the databases ``[storage]`` names. The room, file and notification
  services reach the message service through their
  :data:`~imserver.services.peers.Peer` lookup, answered here by the local message
  service or by its gRPC client.
* The local services other than the gateway are served on one ``grpc.aio`` server
  (``[rpc] host``/``port``, ``--rpc-port``) and each is registered in etcd under a
  lease (:class:`~imserver.discovery.registry.Registration`) at the address
  ``[rpc] advertise`` names (by default the listening one). A graceful stop revokes
  the leases first, so callers stop choosing this instance before it stops
  answering.
* Presence and the online-device routing table are written by the gateway, under
  the gateway process's instance id: a gateway without the user (or notification)
  service in its process keeps the online entries of its sessions in Redis itself
  (:class:`GatewayUsers`, :class:`GatewayDevices`), so a gateway killed with
  ``kill -9`` takes its users offline within ``[redis] ttl``, whatever becomes of
  the user and notification services.

:func:`check_plan` refuses, before anything starts, a set of services that cannot
work (docs/deployment.md, "What each process needs").
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc

from imserver.core.events import EventsRuntime
from imserver.core.live_backends import LiveBackends, instance_id, live_backends
from imserver.core.local_services import open_local_services, start_local_events
from imserver.core.plan import APIS
from imserver.discovery.balancer import ServiceUpstream
from imserver.discovery.breaker import BreakerPolicy
from imserver.discovery.etcd import EtcdClient
from imserver.discovery.registry import Registration
from imserver.protocol.models import PresenceInfo
from imserver.rpc.client import grpc_client
from imserver.rpc.policy import CallPolicy
from imserver.rpc.server import make_server
from imserver.rpc.upstream import CHANNEL_OPTIONS
from imserver.services.file.api import FileService
from imserver.services.message.api import MessageService
from imserver.services.notification.api import NotificationService
from imserver.services.notification.broadcast import BroadcastService, LocalBroadcastService
from imserver.services.notification.online import OnlineDevices
from imserver.services.room.api import RoomService
from imserver.services.user.api import UserService
from imserver.services.user.online import OnlineStore
from imserver.storage.bus import LiveBus
from imserver.storage.databases import redacted, service_database
from imserver.utils.clock import now_ms
from imserver.utils.config import Config
from imserver.utils.errors import Unavailable
from imserver.utils.ids import UserId
from imserver.utils.live import LiveSettings
from imserver.utils.metrics import DiscoveryMetrics, PushMetrics

logger = logging.getLogger(__name__)


def advertised(config: Config, port: int) -> str:
    """The ``host:port`` other processes call this process's gRPC server at."""
    if config.rpc.advertise:
        return config.rpc.advertise
    host = config.rpc.host or config.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


class GatewayUsers:
    """The user service as a gateway apart from it calls it: the online set of this
    gateway's sessions is written under the gateway's instance id (its
    :class:`OnlineStore`), everything else goes to the user service."""

    def __init__(self, remote: UserService, online: OnlineStore) -> None:
        self._remote = remote
        self._online = online

    def __getattr__(self, name: str) -> Any:
        return getattr(self._remote, name)

    async def set_online(self, user: UserId) -> PresenceInfo | None:
        """Mark the user online on this gateway (their first session here opened);
        ``None`` when another gateway holds one already."""
        await self._remote.get_user(user)
        if await self._online.add(user):
            return None
        return PresenceInfo(user=user, status="online", last_seen=now_ms())

    async def set_offline(self, user: UserId) -> PresenceInfo:
        """Take the user out of this gateway's set, then let the user service store
        ``last_seen`` (it answers ``online`` when another gateway holds a session)."""
        await self._online.remove(user)
        return await self._remote.set_offline(user)


class GatewayDevices:
    """The notification service as a gateway apart from it calls it: the online
    devices of this gateway's sessions are written under the gateway's instance id
    (its :class:`OnlineDevices`), which the notification service reads."""

    def __init__(self, remote: NotificationService, devices: OnlineDevices) -> None:
        self._remote = remote
        self._devices = devices

    def __getattr__(self, name: str) -> Any:
        return getattr(self._remote, name)

    async def device_online(self, user: UserId, device: str) -> None:
        """A live session of ``device`` started on this gateway."""
        await self._devices.add(user, device)

    async def device_offline(self, user: UserId, device: str) -> None:
        """A live session of ``device`` on this gateway ended."""
        await self._devices.remove(user, device)


class _Remotes:
    """The gRPC clients of the services not in this process, one registry watch
    each, made when first asked for."""

    def __init__(self, config: Config, etcd: EtcdClient, metrics: DiscoveryMetrics) -> None:
        self._config = config
        self._etcd = etcd
        self._metrics = metrics
        self._policy = CallPolicy.of(config.rpc)
        cfg = config.etcd
        self._breakers = BreakerPolicy(
            failures=cfg.breaker_failures, cooldown=cfg.breaker_cooldown, probes=cfg.breaker_probes
        )
        self.upstreams: dict[str, ServiceUpstream] = {}
        self._clients: dict[str, Any] = {}

    def client(self, name: str) -> Any:
        """The client of service ``name`` (its API's interface)."""
        if name not in self._clients:
            cfg = self._config.etcd
            upstream = ServiceUpstream(
                self._etcd,
                prefix=cfg.prefix,
                service=name,
                channel_factory=_channel,
                policy=self._breakers,
                metrics=self._metrics,
                retry_max=cfg.retry_max,
            )
            upstream.start()
            self.upstreams[name] = upstream
            self._clients[name] = grpc_client(APIS[name], upstream, self._policy)
        return self._clients[name]

    async def wait_synced(self, within: float) -> None:
        """Wait (bounded) for every watch's first read of the registry."""
        for name, upstream in self.upstreams.items():
            if not await upstream.wait_synced(within):
                logger.warning("the registry of the %s service not read yet", name)

    async def close(self) -> None:
        """Stop every watch and close every channel."""
        for upstream in self.upstreams.values():
            await upstream.stop()


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


@dataclass(eq=False)
class Distributed:
    """The services of one process of the distributed mode, as the interfaces the
    edge calls (local or over gRPC), with the gRPC server and the registrations of
    the local ones."""

    names: frozenset[str]
    users: UserService
    messages: MessageService
    rooms: RoomService
    files: FileService
    broadcasts: BroadcastService
    notifications: NotificationService
    bus: LiveBus
    push_metrics: PushMetrics | None
    instance: str
    """This process's instance id (its registrations, its presence entries)."""
    local: dict[str, Any]
    """The services of this process, by name (the gateway's excepted)."""
    rpc_address: str = ""
    """``host:port`` of the gRPC server as registered (empty: no local service)."""
    rpc_port: int = 0
    _remotes: _Remotes | None = None
    _live: LiveBackends | None = None
    _server: grpc.aio.Server | None = None
    _registrations: list[Registration] = field(default_factory=list)
    events: EventsRuntime | None = None
    """The event stream's relays and consumer of this process's services."""
    _grace: float = 5.0

    async def check(self) -> None:
        """Raise :class:`Unavailable` when a local service's store cannot be reached
        (the readiness of a process without a gateway)."""
        for service in self.local.values():
            await service.check()

    async def drain(self) -> None:
        """Leave the registry (callers stop choosing this instance), then commit and
        acknowledge every write already queued."""
        for registration in self._registrations:
            await registration.stop()
        message = self.local.get("message")
        if message is not None:
            await message.flush()

    async def close(self) -> None:
        """Stop serving (calls in flight finish within the grace), then close the
        services in :class:`~imserver.core.embedded.Embedded`'s order, the clients
        of the remote services and the live backends."""
        if self._server is not None:
            await self._server.stop(self._grace)
        if self.events is not None:
            await self.events.close_consumers()
        for name in ("message", "notification", "room", "file", "user"):
            if name in self.local:
                await self.local[name].close()
        if self.events is not None:
            await self.events.close()
        if self._remotes is not None:
            await self._remotes.close()
        if self._live is not None:
            if "user" not in self.local:
                await self._live.online.close()
            if "notification" not in self.local:
                await self._live.devices.close()
            if self._live.close is not None:
                await self._live.close()


async def build_distributed(
    config: Config,
    names: frozenset[str],
    etcd: EtcdClient,
    *,
    live: LiveSettings | None = None,
    metrics: DiscoveryMetrics | None = None,
    rpc_port: int | None = None,
) -> Distributed:
    """Build the services ``names`` of this process and the clients of the others,
    serve the local ones over gRPC and register them in etcd (see the module
    docstring). ``check_plan(config, names)`` has passed."""
    live = LiveSettings(config) if live is None else live
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    db = {name: service_database(config.storage, data_dir, name) for name in names - {"gateway"}}
    for name, database in db.items():
        logger.info("%s database: %s", name, redacted(database.url))
    instance = instance_id()
    remotes = _Remotes(config, etcd, metrics or DiscoveryMetrics())
    shared = await live_backends(config, instance)
    local: dict[str, Any] = {}

    def service(name: str) -> Any:
        return local[name] if name in local else remotes.client(name)

    # Other instances of a service may write its database: no cache of what they change.
    await open_local_services(
        config,
        names,
        local=local,
        reach=service,
        db=db,
        live=live,
        shared=shared,
        sole_instance=False,
    )
    runtime = await start_local_events(config, db, local)
    users: UserService = service("user")
    notifications: NotificationService = service("notification")
    if "gateway" in names:
        if "user" not in names:
            users = cast(UserService, GatewayUsers(users, shared.online))
        if "notification" not in names:
            notifications = cast(NotificationService, GatewayDevices(notifications, shared.devices))
    built = Distributed(
        names=names,
        users=users,
        messages=service("message"),
        rooms=service("room"),
        files=service("file"),
        broadcasts=LocalBroadcastService(
            users=users, messages=service("message"), max_body=config.limits.max_body
        ),
        notifications=notifications,
        bus=shared.bus,
        push_metrics=local["notification"].stats if "notification" in local else None,
        instance=instance,
        local={name: s for name, s in local.items()},
        _remotes=remotes,
        _live=shared,
        events=runtime,
        _grace=config.shutdown_grace,
    )
    try:
        await _serve(built, config, etcd, rpc_port)
        await remotes.wait_synced(config.etcd.request_timeout)
    except BaseException:
        await built.close()
        raise
    return built


async def _serve(
    built: Distributed, config: Config, etcd: EtcdClient, rpc_port: int | None
) -> None:
    """Serve the local services on one gRPC server and register each in etcd."""
    if not built.local:
        return
    server = make_server(*((APIS[name], s) for name, s in built.local.items()))
    host = config.rpc.host or config.host
    port = config.rpc.port if rpc_port is None else rpc_port
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise Unavailable(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    built._server = server
    built.rpc_port = bound
    built.rpc_address = advertised(config, bound)
    for name in sorted(built.local):
        registration = Registration(
            etcd,
            prefix=config.etcd.prefix,
            service=name,
            instance=built.instance,
            address=built.rpc_address,
            ttl=config.etcd.lease_ttl,
        )
        registration.start()
        built._registrations.append(registration)
    for registration in built._registrations:
        if not await registration.wait_registered(config.etcd.request_timeout):
            logger.warning("%s not registered yet: etcd does not answer", registration.key)
    logger.info(
        "gRPC %s:%d (registered as %s): %s",
        host,
        bound,
        built.rpc_address,
        ", ".join(sorted(built.local)),
    )
