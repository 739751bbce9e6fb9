"""The serialising loopback really serialises: copies cross, live objects fail, errors
and streams cross as data, and an op's ``rid`` stays behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable
from typing import Any, Protocol

import msgspec
import pytest

from imserver.protocol import ops
from imserver.services.file.api import QuotaExceeded, RangeNotSatisfiable
from imserver.services.loopback import loopback
from imserver.services.message.api import Members
from imserver.services.user.api import RefreshTokenReused
from imserver.utils.errors import BadRequest, IMError, Internal, NotFound, RateLimited
from imserver.utils.ids import LoginId, UserId


class Echo(Protocol):
    async def members(self, users: Iterable[str], version: int) -> Members: ...

    async def meta(self, meta: dict[str, Any]) -> dict[str, Any]: ...

    async def history(self, req: ops.History) -> str | None: ...

    async def fail(self, error: str) -> None: ...

    def send(self, body: str) -> Awaitable[int]: ...

    def read(self, count: int) -> AsyncIterator[bytes]: ...

    async def upload(self, body: AsyncIterable[bytes]) -> int: ...


class LocalEcho:
    """A local implementation that remembers what it received."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.result: Any = None

    async def members(self, users: Iterable[str], version: int) -> Members:
        if self.result is not None:
            return self.result  # type: ignore[no-any-return]
        got = Members.of(users, version)
        self.received.append(got)
        return got

    async def meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        self.received.append(meta)
        return meta

    async def history(self, req: ops.History) -> str | None:
        self.received.append(req)
        return req.rid

    async def fail(self, error: str) -> None:
        errors: dict[str, Exception] = {
            "reused": RefreshTokenReused("spent token", login=LoginId("l-7"), user=UserId("u-7")),
            "rate": RateLimited(1.25),
            "quota": QuotaExceeded("over"),
            "range": RangeNotSatisfiable(10),
            "notfound": NotFound("no user x", field="user"),
            "foreign": RuntimeError("a bug"),
        }
        exc = errors[error]
        if isinstance(exc, IMError):
            exc.rid = "r-1"
        raise exc

    def send(self, body: str) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, len(body))
        return fut

    async def read(self, count: int) -> AsyncIterator[bytes]:
        for i in range(count):
            yield bytes([i])
        raise NotFound("blob gone")

    async def upload(self, body: AsyncIterable[bytes]) -> int:
        total = 0
        async for chunk in body:
            self.received.append(chunk)
            total += len(chunk)
        return total


@pytest.fixture
def local() -> LocalEcho:
    return LocalEcho()


@pytest.fixture
def echo(local: LocalEcho) -> Echo:
    return loopback(Echo, local)


async def test_arguments_and_results_cross_as_copies(echo: Echo, local: LocalEcho) -> None:
    got = await echo.members((u for u in ("ua", "ub")), 3)  # a generator crosses as a list
    assert got == Members(("ua", "ub"), 3) and got.set == {"ua", "ub"}
    assert got is not local.received[0]
    meta = {"n": 2**63 - 1, "nested": [1.5, "x"]}
    assert await echo.meta(meta) == meta
    assert local.received[1] is not meta


async def test_an_argument_that_cannot_be_encoded_fails(echo: Echo, local: LocalEcho) -> None:
    with pytest.raises(TypeError):
        await echo.meta({"lock": asyncio.Lock()})
    assert local.received == []


async def test_a_returned_live_object_fails(echo: Echo, local: LocalEcho) -> None:
    local.result = asyncio.Lock()
    with pytest.raises(TypeError):
        await echo.members(["ua"], 1)
    local.result = {"users": ["ua"], "version": "one"}  # the wrong type is refused too
    with pytest.raises(msgspec.ValidationError):
        await echo.members(["ua"], 1)


async def test_an_op_crosses_without_its_rid(echo: Echo, local: LocalEcho) -> None:
    assert await echo.history(ops.History(conv="d:ua:ub", rid="r-42")) is None
    assert local.received[0].rid is None and local.received[0].conv == "d:ua:ub"


async def test_an_invalid_op_is_a_bad_request_naming_the_field(
    echo: Echo, local: LocalEcho
) -> None:
    with pytest.raises(BadRequest) as info:
        await echo.history(ops.History(conv="d:"))  # built without validation
    assert info.value.field == "conv"
    assert local.received == []


async def test_errors_cross_as_their_own_class_with_their_data(echo: Echo) -> None:
    with pytest.raises(RefreshTokenReused) as reused:
        await echo.fail("reused")
    assert (reused.value.code, reused.value.login, reused.value.rid) == (
        "unauthorized",
        "l-7",
        None,
    )
    with pytest.raises(RateLimited) as rate:
        await echo.fail("rate")
    assert rate.value.retry_after == 1.25 and rate.value.message.startswith("rate limit")
    with pytest.raises(QuotaExceeded) as quota:
        await echo.fail("quota")
    assert (quota.value.code, quota.value.field, quota.value.status) == ("too_large", "quota", 413)
    with pytest.raises(RangeNotSatisfiable) as bad_range:
        await echo.fail("range")
    assert (bad_range.value.status, bad_range.value.size) == (416, 10)
    with pytest.raises(NotFound) as missing:
        await echo.fail("notfound")
    assert (missing.value.message, missing.value.field) == ("no user x", "user")


async def test_a_foreign_exception_crosses_as_internal(echo: Echo) -> None:
    with pytest.raises(Internal) as info:
        await echo.fail("foreign")
    assert type(info.value) is Internal


async def test_a_write_answers_a_future(echo: Echo) -> None:
    answer = echo.send("hello")
    assert isinstance(answer, asyncio.Future)  # the gateway's done-callback path
    assert await answer == 5


async def test_a_server_stream_crosses_item_by_item(echo: Echo) -> None:
    got: list[bytes] = []
    with pytest.raises(NotFound):
        async for chunk in echo.read(3):
            got.append(chunk)
    assert got == [b"\x00", b"\x01", b"\x02"]


async def test_a_client_stream_crosses_item_by_item(echo: Echo, local: LocalEcho) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"de"

    assert await echo.upload(body()) == 5
    assert local.received == [b"abc", b"de"]

    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):  # the caller's own failure, as it was
        await echo.upload(broken())


def test_a_synchronous_method_cannot_cross() -> None:
    class Sync(Protocol):
        def is_online(self, user: UserId) -> bool: ...

    class Local:
        def is_online(self, user: UserId) -> bool:
            return True

    with pytest.raises(TypeError, match="synchronous"):
        loopback(Sync, Local())
