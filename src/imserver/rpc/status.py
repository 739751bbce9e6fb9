"""IMServer errors ↔ gRPC statuses, both ways.

An :class:`~imserver.utils.errors.IMError` crosses as the gRPC status of its code
(:data:`STATUS_OF`), with its details in the trailing metadata key
:data:`ERROR_KEY`: the :class:`~imserver.services.loopback.ErrorData` of the error
(its class, code, message, field and the attributes its subclass adds, such as
``retry_after`` or a revoked ``login``) as MessagePack, so the client raises the
same class with the same attributes.

A status without those details comes from something that is not an IMServer
service (a proxy, a peer of another version, gRPC itself): it maps to the code a
client expects (:data:`CODE_OF_FOREIGN`). A deadline or a connection failure is
``unavailable``: the protocol has no timeout code, and ``unavailable`` already says
"a backend is down; retry later".
"""

from __future__ import annotations

import grpc
import msgspec

from imserver.services.loopback import ErrorData, error_data, raise_error
from imserver.utils.errors import ERRORS_BY_CODE, IMError, Internal, Unavailable

ERROR_KEY = "imserver-error-bin"
"""The trailing metadata key of an IMServer error's details (binary: ``-bin``)."""

STATUS_OF: dict[str, grpc.StatusCode] = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "hello_required": grpc.StatusCode.FAILED_PRECONDITION,
    "unsupported_version": grpc.StatusCode.FAILED_PRECONDITION,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "too_large": grpc.StatusCode.OUT_OF_RANGE,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
"""The gRPC status each protocol error code crosses as."""

CODE_OF_FOREIGN: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "bad_request",
    grpc.StatusCode.FAILED_PRECONDITION: "bad_request",
    grpc.StatusCode.UNAUTHENTICATED: "unauthorized",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.ALREADY_EXISTS: "conflict",
    grpc.StatusCode.OUT_OF_RANGE: "too_large",
    # A foreign RESOURCE_EXHAUSTED is a limit of gRPC or a proxy (a message too
    # large, a stream quota): no retry_after to give, so not rate_limited.
    grpc.StatusCode.RESOURCE_EXHAUSTED: "unavailable",
    grpc.StatusCode.INTERNAL: "internal",
    grpc.StatusCode.UNKNOWN: "internal",
    grpc.StatusCode.DATA_LOSS: "internal",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable",
    grpc.StatusCode.CANCELLED: "unavailable",
    grpc.StatusCode.ABORTED: "unavailable",
    grpc.StatusCode.UNIMPLEMENTED: "unavailable",
}
"""The protocol code of a status that carries no IMServer details."""

_ENCODER = msgspec.msgpack.Encoder()
_ERROR_DECODER = msgspec.msgpack.Decoder(ErrorData)


def details_bytes(exc: IMError) -> bytes:
    """The details of ``exc`` as they cross (never its ``rid``)."""
    return _ENCODER.encode(error_data(exc))


def error_of_details(details: bytes) -> IMError:
    """The error whose details are ``details``."""
    try:
        return raise_error(_ERROR_DECODER.decode(details))
    except msgspec.DecodeError:
        return Internal("malformed error details from a service")


def trailers_of(exc: IMError) -> tuple[tuple[str, bytes]]:
    """The trailing metadata that carries ``exc``."""
    return ((ERROR_KEY, details_bytes(exc)),)


def status_of(exc: IMError) -> grpc.StatusCode:
    """The status ``exc`` crosses as."""
    return STATUS_OF.get(exc.code, grpc.StatusCode.INTERNAL)


def details_of(error: grpc.aio.AioRpcError) -> bytes | None:
    """The IMServer error details of a failed call, if it carries them."""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_KEY and isinstance(value, bytes):
            return value
    return None


def is_transport_failure(error: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed in transport (the peer unreachable, the connection
    lost, its deadline passed), not by an answer of the service."""
    if details_of(error) is not None:
        return False
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def error_from(error: grpc.aio.AioRpcError) -> IMError:
    """The :class:`IMError` a failed call raises on the client's side."""
    details = details_of(error)
    if details is not None:
        return error_of_details(details)
    status = error.code()
    code = CODE_OF_FOREIGN.get(status, "internal")
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable("a service did not answer in time")
    if code == "unavailable":
        return Unavailable(f"a service is unavailable ({status.name.lower()})")
    return ERRORS_BY_CODE[code](error.details() or code)
