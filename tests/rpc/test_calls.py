"""The call policy over real gRPC servers on 127.0.0.1: errors both ways, deadlines,
retries only of idempotent calls after transport failures, and the reports an
endpoint gets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from serving import InTurn, closed_address, serving, serving_raw

from imserver.protocol.models import User
from imserver.rpc.apis import schema
from imserver.rpc.client import grpc_client
from imserver.rpc.policy import IDEMPOTENT, CallPolicy
from imserver.rpc.status import STATUS_OF
from imserver.services.file.api import FileService, QuotaExceeded, RangeNotSatisfiable
from imserver.services.loopback import protocol_methods
from imserver.services.user.api import RefreshTokenReused, UserService
from imserver.utils import errors
from imserver.utils.errors import IMError, Unavailable
from imserver.utils.ids import LoginId, UserId

FAST = CallPolicy(deadline=5.0, retry_attempts=3, retry_backoff=0.001, retry_backoff_max=0.002)

ERRORS: list[IMError] = [
    *(
        cls(f"{code} happened", field="f")
        for code, cls in errors.ERRORS_BY_CODE.items()
        if cls is not errors.RateLimited
    ),
    errors.RateLimited(1.5),
    RefreshTokenReused("reused", login=LoginId("l-1"), user=UserId("u-1")),
    QuotaExceeded("over quota"),
    RangeNotSatisfiable(10),
]


class Users:
    """A user service whose answers the test sets, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None
        self.delay = 0.0

    async def _answer(self, user: str) -> User:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return User(id=user, username="u", display_name="U", created=1)

    async def get_user(self, user: UserId) -> User:
        return await self._answer(user)

    async def register(self, username: str, password: str, display_name: str | None) -> User:
        return await self._answer(username)


@pytest.fixture
async def users() -> AsyncIterator[tuple[Users, str]]:
    local = Users()
    async with serving((UserService, local)) as address:
        yield local, address


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
async def test_an_error_crosses_as_its_status_and_comes_back_as_its_class(
    users: tuple[Users, str], error: IMError
) -> None:
    local, address = users
    local.error = error
    upstream = InTurn(address)
    client = grpc_client(UserService, upstream, FAST)
    with pytest.raises(IMError) as info:
        await client.get_user(UserId("a"))
    got = info.value
    assert type(got) is type(error)
    assert (got.code, got.message, got.field) == (error.code, error.message, error.field)
    extra = {k: v for k, v in vars(error).items() if k not in ("message", "field", "rid")}
    assert {k: getattr(got, k) for k in extra} == extra
    # The status on the wire is the one of its code, and the instance answered.
    channel = upstream.endpoints[0].channel
    raw = channel.unary_unary("/imserver.rpc.user.UserService/GetUser")
    with pytest.raises(grpc.aio.AioRpcError) as wire:
        await raw(b"\n\x01a")
    assert wire.value.code() == STATUS_OF[error.code]
    assert (upstream.endpoints[0].successes, upstream.endpoints[0].failures) == (1, 0)
    await upstream.close()


async def test_an_unexpected_exception_is_internal(users: tuple[Users, str]) -> None:
    local, address = users
    local.error = RuntimeError("bug")
    upstream = InTurn(address)
    with pytest.raises(errors.Internal):
        await grpc_client(UserService, upstream, FAST).get_user(UserId("a"))
    await upstream.close()


FOREIGN = [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.BadRequest),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.PERMISSION_DENIED, errors.Forbidden),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthorized),
    (grpc.StatusCode.ALREADY_EXISTS, errors.Conflict),
    (grpc.StatusCode.OUT_OF_RANGE, errors.TooLarge),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.BadRequest),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Unavailable),
    (grpc.StatusCode.INTERNAL, errors.Internal),
    (grpc.StatusCode.UNKNOWN, errors.Internal),
    (grpc.StatusCode.DATA_LOSS, errors.Internal),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.ABORTED, errors.Unavailable),
    (grpc.StatusCode.UNIMPLEMENTED, errors.Unavailable),
]


def _foreign(status: grpc.StatusCode, calls: list[int]) -> grpc.GenericRpcHandler:
    async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        calls.append(1)
        await context.abort(status, "from elsewhere")
        raise AssertionError

    return grpc.method_handlers_generic_handler(
        "imserver.rpc.user.UserService",
        {"GetUser": grpc.unary_unary_rpc_method_handler(fail)},
    )


@pytest.mark.parametrize(("status", "expected"), FOREIGN, ids=lambda v: getattr(v, "name", ""))
async def test_a_status_from_a_peer_that_is_not_imserver_maps_to_a_protocol_code(
    status: grpc.StatusCode, expected: type[IMError]
) -> None:
    calls: list[int] = []
    async with serving_raw(_foreign(status, calls)) as address:
        upstream = InTurn(address)
        with pytest.raises(IMError) as info:
            await grpc_client(UserService, upstream, FAST).get_user(UserId("a"))
        assert type(info.value) is expected
        # A foreign UNAVAILABLE is a transport failure: get_user is retried.
        assert len(calls) == (3 if status == grpc.StatusCode.UNAVAILABLE else 1)
        await upstream.close()


async def test_nothing_listening_is_unavailable_and_an_idempotent_call_is_retried() -> None:
    upstream = InTurn(closed_address())
    client = grpc_client(UserService, upstream, FAST)
    with pytest.raises(Unavailable):
        await client.get_user(UserId("a"))
    assert (upstream.picks, upstream.endpoints[0].failures) == (3, 3)
    await upstream.close()


async def test_a_retry_goes_on_after_transport_failures_until_an_instance_answers(
    users: tuple[Users, str],
) -> None:
    local, address = users
    upstream = InTurn(closed_address(), closed_address(), address)
    user = await grpc_client(UserService, upstream, FAST).get_user(UserId("a"))
    assert user.id == "a"
    assert [(e.successes, e.failures) for e in upstream.endpoints] == [(0, 1), (0, 1), (1, 0)]
    assert local.calls == 1
    await upstream.close()


async def test_a_write_is_not_retried(users: tuple[Users, str]) -> None:
    upstream = InTurn(closed_address(), users[1])
    with pytest.raises(Unavailable):
        await grpc_client(UserService, upstream, FAST).register("bob", "password", None)
    assert upstream.picks == 1 and users[0].calls == 0
    await upstream.close()


async def test_an_application_error_is_not_retried(users: tuple[Users, str]) -> None:
    local, address = users
    local.error = Unavailable("the database is down")
    upstream = InTurn(address)
    with pytest.raises(Unavailable, match="the database is down"):
        await grpc_client(UserService, upstream, FAST).get_user(UserId("a"))
    assert local.calls == 1 and upstream.endpoints[0].failures == 0
    await upstream.close()


async def test_a_slow_server_passes_the_deadline_and_an_idempotent_call_is_retried(
    users: tuple[Users, str],
) -> None:
    local, address = users
    local.delay = 1.0
    upstream = InTurn(address)
    policy = CallPolicy(deadline=0.2, retry_attempts=2, retry_backoff=0.001)
    with pytest.raises(Unavailable, match="did not answer in time"):
        await grpc_client(UserService, upstream, policy).get_user(UserId("a"))
    assert local.calls == 2 and upstream.endpoints[0].failures == 2
    local.calls = 0
    with pytest.raises(Unavailable, match="did not answer in time"):
        await grpc_client(UserService, upstream, policy).register("bob", "password", None)
    assert local.calls == 1
    await upstream.close()


async def test_a_server_stream_past_its_deadline_is_unavailable() -> None:
    class Slow:
        async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
            yield b"first"
            await asyncio.sleep(2)
            yield b"never"

    async with serving((FileService, Slow())) as address:
        upstream = InTurn(address)
        client = grpc_client(FileService, upstream, CallPolicy(stream_deadline=0.3))
        got: list[bytes] = []
        with pytest.raises(Unavailable, match="did not answer in time"):
            async for chunk in client.read("k", 0, 10):
                got.append(chunk)
        assert got == [b"first"]
        await upstream.close()


def test_the_idempotent_set_names_real_methods_and_no_creating_write() -> None:
    apis = {service.name: service.protocol for service in schema().services.values()}
    assert set(IDEMPOTENT) == set(apis)
    for api, names in IDEMPOTENT.items():
        assert names <= set(protocol_methods(apis[api])), api
    for api, name in [
        ("MessageService", "send"),
        ("MessageService", "post_system"),
        ("UserService", "register"),
        ("UserService", "login"),
        ("UserService", "refresh"),
        ("RoomService", "create"),
        ("RoomService", "join"),
        ("FileService", "upload"),
        ("NotificationService", "committed"),
        ("BroadcastService", "broadcast"),
    ]:
        assert name not in IDEMPOTENT[api]


def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling() -> None:
    policy = CallPolicy(retry_backoff=0.1, retry_backoff_max=0.5)
    rand = random.Random(7)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        draws = [policy.backoff(retry, rand) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.9 and min(draws) < ceiling * 0.1


class Writer:
    """A message service whose sends answer when the test says."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, asyncio.Future[Any]]] = []
        self._want = 0
        self._arrived = asyncio.Event()

    def send(self, caller: Any, req: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queued.append((req.cid, future))
        if len(self.queued) >= self._want:
            self._arrived.set()
        return future

    async def until(self, count: int) -> None:
        """Return once ``count`` sends have arrived."""
        self._want = count
        while len(self.queued) < count:
            self._arrived.clear()
            await self._arrived.wait()


def _send(cid: str) -> Any:
    from imserver.protocol import ops
    from imserver.utils.ids import ConvId

    return ops.Send(conv=ConvId("d:a:b"), cid=cid, type="text", body="x")


async def test_writes_reach_the_service_in_the_order_issued_and_answer_out_of_order() -> None:
    from imserver.protocol import ops
    from imserver.services.caller import Caller
    from imserver.services.message.api import MessageService

    local = Writer()
    async with serving((MessageService, local)) as address:
        upstream = InTurn(address)
        client = grpc_client(MessageService, upstream, FAST)
        caller = Caller(UserId("a"), LoginId("l"))
        futures = [client.send(caller, _send(f"c{i}")) for i in range(200)]
        await local.until(200)
        assert [cid for cid, _ in local.queued] == [f"c{i}" for i in range(200)]
        for seq, (cid, future) in reversed(list(enumerate(local.queued, 1))):
            if seq == 7:
                future.set_exception(errors.Forbidden("blocked", field="conv"))
            else:
                future.set_result(ops.SendData(conv="d:a:b", seq=seq, ts=1, cid=cid, dup=False))
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[6], errors.Forbidden) and results[6].field == "conv"
        assert [r.seq for i, r in enumerate(results) if i != 6] == [
            s for s in range(1, 201) if s != 7
        ]
        await upstream.close()


async def test_a_write_past_its_deadline_and_the_writes_of_a_lost_stream_are_unavailable() -> None:
    from imserver.services.caller import Caller
    from imserver.services.message.api import MessageService

    local = Writer()
    caller = Caller(UserId("a"), LoginId("l"))
    async with serving((MessageService, local)) as address:
        upstream = InTurn(address)
        client = grpc_client(MessageService, upstream, CallPolicy(deadline=0.2))
        with pytest.raises(Unavailable, match="did not answer in time"):
            await client.send(caller, _send("late"))
        assert upstream.endpoints[0].failures == 1
        waiting = client.send(caller, _send("lost"))
        await local.until(2)
    # The server stopped with the write unanswered.
    with pytest.raises(Unavailable):
        await waiting
    await upstream.close()
