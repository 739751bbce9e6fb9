"""The exception tree carries exactly the error codes and HTTP statuses of docs/protocol.md §2."""

from __future__ import annotations

import pytest

from imserver.utils import errors
from imserver.utils.errors import (
    ERRORS_BY_CODE,
    BadRequest,
    Conflict,
    Forbidden,
    HelloRequired,
    IMError,
    Internal,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedVersion,
)

# docs/protocol.md §2, "Error codes", in its order.
PROTOCOL_ERRORS: list[tuple[type[IMError], str, int]] = [
    (BadRequest, "bad_request", 400),
    (HelloRequired, "hello_required", 400),
    (UnsupportedVersion, "unsupported_version", 400),
    (Unauthorized, "unauthorized", 401),
    (Forbidden, "forbidden", 403),
    (NotFound, "not_found", 404),
    (Conflict, "conflict", 409),
    (TooLarge, "too_large", 413),
    (RateLimited, "rate_limited", 429),
    (Internal, "internal", 500),
    (Unavailable, "unavailable", 503),
]

ids = [code for _, code, _ in PROTOCOL_ERRORS]


def make(cls: type[IMError], message: str = "") -> IMError:
    if cls is RateLimited:
        return RateLimited(1.0, message)
    return cls(message)


@pytest.mark.parametrize(("cls", "code", "status"), PROTOCOL_ERRORS, ids=ids)
def test_class_has_protocol_code_and_status(cls: type[IMError], code: str, status: int) -> None:
    assert issubclass(cls, IMError)
    assert cls.code == code
    assert cls.status == status
    err = make(cls)
    assert err.code == code
    assert err.status == status


@pytest.mark.parametrize(("cls", "code", "status"), PROTOCOL_ERRORS, ids=ids)
def test_instance_carries_message_field_and_no_rid(
    cls: type[IMError], code: str, status: int
) -> None:
    err = make(cls, "went wrong")
    assert err.message == "went wrong"
    assert str(err) == "went wrong"
    assert err.rid is None
    assert err.field is None


@pytest.mark.parametrize(
    "cls", [cls for cls, _, _ in PROTOCOL_ERRORS if cls is not RateLimited], ids=lambda c: c.code
)
def test_message_defaults_to_code_and_field_is_kept(cls: type[IMError]) -> None:
    assert cls().message == cls.code
    assert str(cls()) == cls.code
    assert cls("bad", field="conv").field == "conv"


def test_errors_by_code_is_exactly_the_protocol_table() -> None:
    expected = {code: cls for cls, code, _ in PROTOCOL_ERRORS}
    assert expected == ERRORS_BY_CODE


def test_codes_are_unique() -> None:
    codes = [code for _, code, _ in PROTOCOL_ERRORS]
    assert len(set(codes)) == len(codes)


def test_errors_by_code_round_trips_each_class() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code == code


def test_every_imerror_subclass_in_the_module_is_listed() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, IMError) and obj is not IMError
    }
    assert defined == set(ERRORS_BY_CODE.values())


def test_rate_limited_carries_retry_after() -> None:
    err = RateLimited(0.25)
    assert err.retry_after == 0.25
    assert err.code == "rate_limited"
    assert err.status == 429
    assert "0.250" in err.message
    assert isinstance(err, IMError)


def test_rate_limited_custom_message() -> None:
    err = RateLimited(3, "slow down")
    assert err.retry_after == 3
    assert err.message == "slow down"


def test_errors_are_exceptions_caught_as_imerror() -> None:
    with pytest.raises(IMError) as info:
        raise Forbidden("not a member of r:9")
    assert info.value.code == "forbidden"
