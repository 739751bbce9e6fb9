"""The protocol-conformance check the service tests rely on finds each kind of departure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

import pytest
from conformance import protocol_methods, signature_mismatches


class Base(Protocol):
    async def get(self, key: str) -> int:
        """An inherited method."""


class Store(Base, Protocol):
    def put(self, key: str, value: int, *, overwrite: bool = False) -> Awaitable[None]:
        """Resolves when stored."""

    def size(self) -> int:
        """A plain method."""


class Good:
    async def get(self, key: str) -> int:
        return 0

    def put(
        self, key: str, value: int, *, overwrite: bool = False, trace: bool = False
    ) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def size(self) -> int:
        return 0


class AsyncPut(Good):
    async def put(self, key: str, value: int, *, overwrite: bool = False) -> None:
        return None


class NoGet:
    put = Good.put
    size = Good.size


class SyncGet(Good):
    def get(self, key: str) -> int:  # type: ignore[override]
        return 0


class RenamedParameter(Good):
    async def get(self, name: str) -> int:  # type: ignore[override]
        return 0


class OtherType(Good):
    async def get(self, key: bytes) -> int:  # type: ignore[override]
        return 0


class OtherReturn(Good):
    def size(self) -> str:  # type: ignore[override]
        return ""


class NoDefault(Good):
    def put(  # type: ignore[override]
        self, key: str, value: int, *, overwrite: bool
    ) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()


class ExtraRequired(Good):
    def size(self, unit: str) -> int:  # type: ignore[override]
        return 0


class NotAwaitable(Good):
    def put(  # type: ignore[override]
        self, key: str, value: int, *, overwrite: bool = False
    ) -> None:
        return None


def test_methods_of_protocol_bases_count() -> None:
    assert sorted(protocol_methods(Store)) == ["get", "put", "size"]


@pytest.mark.parametrize("impl", [Good, AsyncPut])
def test_a_conforming_class_has_no_mismatch(impl: type) -> None:
    assert signature_mismatches(Store, impl) == []


@pytest.mark.parametrize(
    ("impl", "expected"),
    [
        (NoGet, "get: missing"),
        (SyncGet, "get: returns <class 'int'>, expected async <class 'int'>"),
        (RenamedParameter, "get: parameter 'name'"),
        (OtherType, "get: parameter 'key' is <class 'bytes'>"),
        (OtherReturn, "size: returns <class 'str'>"),
        (NoDefault, "put: parameter 'overwrite' lacks its default"),
        (ExtraRequired, "size: extra parameter 'unit' without a default"),
        (NotAwaitable, "put: returns <class 'NoneType'>, expected"),
    ],
)
def test_each_departure_is_named(impl: type, expected: str) -> None:
    problems = signature_mismatches(Store, impl)
    assert len(problems) == 1 and problems[0].startswith(expected), problems
